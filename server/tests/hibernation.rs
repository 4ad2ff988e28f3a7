//! Idle-group hibernation against real `basaltd` processes: many idle groups go to sleep (their
//! heartbeats stop, as the nodes' own counters show), and killing the node that leads some of
//! them still gets those shards new leaders that accept writes within a few seconds. Alone in its
//! test binary so that its timing is not distorted by other tests' clusters.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use basalt_bench::local_cluster::LocalCluster;
use basalt_bench::metrics_scrape::{fetch_metrics, parse_metric_labeled};
use basalt_client::{Client, Shard, Sharding};
use basalt_proto::keycodec;
use bytes::Bytes;
use common::{client, client_of, start_cluster};
use tokio::task::JoinSet;

const SHARDS: u32 = 24;
/// Meta group, the default keyspace's shard, and the new keyspace's shards: all on every node.
const GROUPS_PER_NODE: f64 = SHARDS as f64 + 2.0;
/// How long the groups may take to fall asleep: the idle time before quiescing (2 s) plus a few
/// liveness rounds, with room for a loaded machine.
const SLEEP_WITHIN: Duration = Duration::from_secs(30);
/// How long the shards the killed node led may take to accept writes again: a sleeping
/// follower wakes `liveness_timeout` (1 s) plus up to 300 ms of jitter after the last word from
/// its leader's node, then wins an election in a round trip. The bound leaves room for a debug
/// build on a loaded 2-core machine while staying far below "never".
const FAILOVER_WITHIN: Duration = Duration::from_secs(8);

async fn metric(cluster: &LocalCluster, id: u64, name: &str, label: &str, value: &str) -> f64 {
    let addr = cluster.metrics_addr(id).expect("node exists");
    let text = fetch_metrics(addr).await.expect("metrics endpoint answers");
    parse_metric_labeled(&text, name, label, value).unwrap_or(0.0)
}

/// Replicas of node `id` that stopped ticking: quiesced leaders and sleeping followers.
async fn sleeping(cluster: &LocalCluster, id: u64) -> f64 {
    let state = |s| metric(cluster, id, "basalt_raft_hibernation_groups", "state", s);
    state("quiesced").await + state("asleep").await
}

/// Heartbeats sent by all running nodes together so far.
async fn heartbeats_sent(cluster: &LocalCluster) -> f64 {
    let mut total = 0.0;
    for id in cluster.node_ids().into_iter().filter(|id| cluster.is_running(*id)) {
        total += metric(cluster, id, "basalt_peer_rpcs_sent_total", "kind", "heartbeat").await;
    }
    total
}

/// A user key that the keyspace with id `keyspace` places in `shard`.
fn key_in(shard: &Shard, keyspace: u32) -> Bytes {
    (0u32..)
        .map(|n| format!("probe-{n}"))
        .find(|k| {
            let stored = keycodec::encode_key(keyspace, true, k.as_bytes());
            &shard.start[..] <= stored.as_slice() && (shard.end.is_empty() || stored.as_slice() < &shard.end[..])
        })
        .map(Bytes::from)
        .expect("every hash shard holds some probe key")
}

/// Every shard of `keyspace` with its leader as node `id` sees it, once every shard has one.
async fn leaders(c: &Client, keyspace: &str, timeout: Duration) -> Vec<Shard> {
    let deadline = Instant::now() + timeout;
    loop {
        let shards = c.list_shards(Some(keyspace), false).await.unwrap_or_default();
        if shards.len() == SHARDS as usize && shards.iter().all(|s| s.leader_id != 0) {
            return shards;
        }
        assert!(Instant::now() < deadline, "shards without a leader: {shards:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_groups_sleep_and_a_dead_leaders_shards_fail_over() {
    let (cluster, _) = start_cluster(3, None).await;
    let admin = client(&cluster, Duration::from_secs(30)).await;
    let ks = admin
        .create_keyspace("idle", Sharding::Hash, SHARDS, 3)
        .await
        .expect("create the hash keyspace");
    for id in cluster.node_ids() {
        leaders(
            &client_of(cluster.endpoint(id).unwrap()).await,
            "idle",
            Duration::from_secs(30),
        )
        .await;
    }

    // Idle: every group on every node goes to sleep, and then no heartbeat is sent at all.
    let deadline = Instant::now() + SLEEP_WITHIN;
    loop {
        let mut asleep = Vec::new();
        for id in cluster.node_ids() {
            asleep.push(sleeping(&cluster, id).await);
        }
        if asleep.iter().all(|n| *n == GROUPS_PER_NODE) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every group slept within {SLEEP_WITHIN:?}: {asleep:?} of {GROUPS_PER_NODE} per node"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let before = heartbeats_sent(&cluster).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = heartbeats_sent(&cluster).await - before;
    assert_eq!(during, 0.0, "{during} heartbeats in 3 s with every group asleep");

    // Kill the node that leads the most of the new shards.
    let view = leaders(
        &client_of(cluster.endpoint(1).unwrap()).await,
        "idle",
        Duration::from_secs(5),
    )
    .await;
    let mut led: BTreeMap<u64, Vec<Shard>> = BTreeMap::new();
    for s in view {
        led.entry(s.leader_id).or_default().push(s);
    }
    let (&victim, victims_shards) = led
        .iter()
        .max_by_key(|(_, v)| v.len())
        .expect("the shards have leaders");
    assert!(!victims_shards.is_empty());
    let probes: Vec<(u64, Bytes)> = victims_shards.iter().map(|s| (s.id, key_in(s, ks.id))).collect();
    cluster.kill(victim).expect("the victim is running");
    let killed_at = Instant::now();

    // Every shard it led accepts a write again, through a fresh client configured like the
    // failover test's probe (short attempts: a dead endpoint refuses at once).
    let mut cfg = cluster.client_config();
    cfg.attempt_timeout = Duration::from_millis(300);
    cfg.backoff_max = Duration::from_millis(100);
    cfg.deadline = FAILOVER_WITHIN + Duration::from_secs(5);
    let c = Client::connect(cfg).await.expect("valid config").with_keyspace("idle");
    let mut writes = JoinSet::new();
    for (shard, key) in probes.clone() {
        let c = c.clone();
        writes.spawn(async move {
            let r = c.put(key.clone(), Bytes::from_static(b"after failover")).await;
            (shard, key, r, Instant::now())
        });
    }
    let survivor = cluster
        .node_ids()
        .into_iter()
        .find(|id| *id != victim)
        .expect("3 nodes");
    let watcher = client_of(cluster.endpoint(survivor).unwrap()).await;
    let victim_shards: Vec<u64> = probes.iter().map(|(s, _)| *s).collect();
    let elected = loop {
        let shards = watcher.list_shards(Some("idle"), false).await.unwrap_or_default();
        let moved = shards
            .iter()
            .filter(|s| victim_shards.contains(&s.id))
            .all(|s| s.leader_id != 0 && s.leader_id != victim);
        if moved && !shards.is_empty() {
            break killed_at.elapsed();
        }
        assert!(killed_at.elapsed() < FAILOVER_WITHIN, "no new leaders: {shards:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut slowest = Duration::ZERO;
    while let Some(done) = writes.join_next().await {
        let (shard, key, r, at) = done.expect("a writer task panicked");
        r.unwrap_or_else(|e| panic!("write {key:?} to shard {shard} after killing node {victim}: {e}"));
        slowest = slowest.max(at - killed_at);
    }
    eprintln!(
        "node {victim} led {} of {SHARDS} sleeping shards; node {survivor} saw new leaders for all {elected:?} \
         and all accepted writes {slowest:?} after it was killed",
        probes.len()
    );
    assert!(
        slowest < FAILOVER_WITHIN,
        "the shards node {victim} led accepted writes only {slowest:?} after it was killed"
    );

    // They have new leaders among the survivors, and the writes read back.
    let now = leaders(
        &client_of(cluster.endpoint(survivor).unwrap()).await,
        "idle",
        Duration::from_secs(5),
    )
    .await;
    for (shard, key) in &probes {
        let s = now.iter().find(|s| s.id == *shard).expect("the shard still exists");
        assert_ne!(s.leader_id, victim, "shard {shard} still names the dead node as leader");
        assert_eq!(
            c.get(key.clone()).await.expect("read back"),
            Some(Bytes::from_static(b"after failover"))
        );
    }
    cluster.terminate_all().await.expect("clean shutdown");
}
