//! Shared support for the process-level tests: real `basaltd` processes on ephemeral loopback
//! ports (through [`LocalCluster`]), a concurrent write load that records exactly which writes were
//! acknowledged, and the check that every acknowledged write reads back.
//!
//! The load's bookkeeping is what makes the durability tests meaningful: a write counts only when
//! the client saw success, and a write whose outcome is unknown (it failed mid-crash) is neither
//! required nor forbidden afterwards. Each writer owns its keys, so the expected value of every
//! acknowledged key is known without any ordering assumptions between writers.

#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_bench::local_cluster::{LocalCluster, LocalClusterOptions};
use basalt_client::{Client, ClientConfig};
use bytes::Bytes;
use tokio::task::JoinSet;

/// The `basaltd` built for this test run.
pub fn basaltd() -> &'static str {
    env!("CARGO_BIN_EXE_basaltd")
}

/// Starts `nodes` processes and waits until they agree on a leader.
///
/// Every founding member starts an election at once, so the first leader can be deposed a moment
/// later by a candidate of a higher term. Tests that address one node directly need the leader
/// to stay put, hence the wait for every node to report the same leader in the same term.
pub async fn start_cluster(nodes: usize, snapshot_threshold: Option<u64>) -> (LocalCluster, u64) {
    let mut opts = LocalClusterOptions::new(nodes, basaltd());
    opts.snapshot_threshold = snapshot_threshold;
    let cluster = LocalCluster::start(opts).await.expect("cluster starts");
    let leader = settled_leader(&cluster, Duration::from_secs(15)).await;
    settled_shard_leader(&cluster, basalt_server::node::DEFAULT_GROUP, Duration::from_secs(15)).await;
    (cluster, leader)
}

/// Waits until every running node's listing of `shard` names the same leader, twice in a row
/// 200 ms apart. The meta group (whose leader [`settled_leader`] waits for) and the default keyspace's
/// shard elect their leaders independently; tests that send raw requests need both.
pub async fn settled_shard_leader(cluster: &LocalCluster, shard: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    let mut previous = None;
    loop {
        let mut views = Vec::new();
        let running = running(cluster);
        for &id in &running {
            let Ok(endpoint) = cluster.endpoint(id) else { continue };
            let shards = client_of(endpoint).await.list_shards(None, false).await;
            if let Some(s) = shards.ok().and_then(|all| all.into_iter().find(|s| s.id == shard)) {
                views.push(s.leader_id);
            }
        }
        let agreed = views.len() == running.len() && views[0] != 0 && views.iter().all(|v| *v == views[0]);
        if agreed && previous == Some(views[0]) {
            return views[0];
        }
        previous = agreed.then(|| views[0]);
        assert!(
            Instant::now() < deadline,
            "shard {shard} has no settled leader within {timeout:?}: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The nodes of `cluster` whose processes run (a killed or stopped node has no view to agree).
fn running(cluster: &LocalCluster) -> Vec<u64> {
    cluster
        .node_ids()
        .into_iter()
        .filter(|id| cluster.is_running(*id))
        .collect()
}

/// Waits until every running node names the same leader in the same term, twice in a row
/// 200 ms apart.
pub async fn settled_leader(cluster: &LocalCluster, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    let mut previous = None;
    loop {
        let mut views = Vec::new();
        let running = running(cluster);
        for &id in &running {
            if let Ok(s) = cluster.cluster_status(id).await {
                views.push((s.leader_id, s.header.map_or(0, |h| h.term)));
            }
        }
        let agreed = views.len() == running.len() && views[0].0 != 0 && views.iter().all(|v| *v == views[0]);
        if agreed && previous == Some(views[0]) {
            return views[0].0;
        }
        previous = agreed.then(|| views[0]);
        assert!(
            Instant::now() < deadline,
            "no settled leader within {timeout:?}: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A client of every node of `cluster` whose calls give up after `deadline`.
pub async fn client(cluster: &LocalCluster, deadline: Duration) -> Client {
    let mut cfg: ClientConfig = cluster.client_config();
    cfg.deadline = deadline;
    cfg.attempt_timeout = Duration::from_millis(1500);
    Client::connect(cfg).await.expect("client config is valid")
}

/// A client of exactly one endpoint, for checking what that node says.
pub async fn client_of(endpoint: String) -> Client {
    let mut cfg = ClientConfig::new([endpoint]);
    cfg.deadline = Duration::from_secs(10);
    Client::connect(cfg).await.expect("client config is valid")
}

/// What a [`Load`] saw: for each acknowledged key, its value; and how many writes ended unknown.
#[derive(Default, Debug)]
pub struct LoadResult {
    pub acked: BTreeMap<Bytes, Bytes>,
    pub unknown: usize,
}

/// Concurrent writers, each putting its own keys `w{writer}-{n}` until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: JoinSet<LoadResult>,
}

impl Load {
    pub fn start(client: &Client, writers: usize, tag: &str) -> Load {
        Self::start_sized(client, writers, tag, 0)
    }

    /// Like [`Load::start`], with each value padded to at least `value_len` bytes.
    pub fn start_sized(client: &Client, writers: usize, tag: &str, value_len: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();
        for w in 0..writers {
            let client = client.clone();
            let stop = stop.clone();
            let tag = tag.to_string();
            tasks.spawn(async move {
                let mut r = LoadResult::default();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = Bytes::from(format!("{tag}-w{w:02}-{n:06}"));
                    let mut value = format!("value {n} of writer {w} ({tag})");
                    if value.len() < value_len {
                        value.push_str(&".".repeat(value_len - value.len()));
                    }
                    let value = Bytes::from(value);
                    match client.put(key.clone(), value.clone()).await {
                        Ok(()) => {
                            r.acked.insert(key, value);
                        }
                        Err(_) => r.unknown += 1,
                    }
                    n += 1;
                }
                r
            });
        }
        Load { stop, tasks }
    }

    /// Stops the writers and returns what they saw. A put in flight finishes (or fails) first,
    /// so its outcome is recorded like any other.
    pub async fn finish(mut self) -> LoadResult {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = LoadResult::default();
        while let Some(r) = self.tasks.join_next().await {
            let r = r.expect("a writer task panicked");
            all.acked.extend(r.acked);
            all.unknown += r.unknown;
        }
        all
    }
}

/// Writes `count` keys `{tag}-{n}` with 8 concurrent writers; every one must be acknowledged.
pub async fn write_keys(client: &Client, tag: &str, count: usize) -> BTreeMap<Bytes, Bytes> {
    let mut tasks = JoinSet::new();
    let writers = 8;
    for w in 0..writers {
        let client = client.clone();
        let tag = tag.to_string();
        tasks.spawn(async move {
            let mut acked = BTreeMap::new();
            for n in (w..count).step_by(writers) {
                let key = Bytes::from(format!("{tag}-{n:06}"));
                let value = Bytes::from(format!("{tag} value {n}"));
                client
                    .put(key.clone(), value.clone())
                    .await
                    .unwrap_or_else(|e| panic!("put {key:?}: {e}"));
                acked.insert(key, value);
            }
            acked
        });
    }
    let mut all = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.expect("a writer task panicked"));
    }
    all
}

/// Reads every key of `expected` (linearizably, 8 readers at a time) and fails the test on any
/// missing or wrong value.
pub async fn verify(client: &Client, expected: &BTreeMap<Bytes, Bytes>) {
    let pairs: Vec<(Bytes, Bytes)> = expected.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut tasks = JoinSet::new();
    for chunk in pairs.chunks(pairs.len().div_ceil(8).max(1)) {
        let client = client.clone();
        let chunk = chunk.to_vec();
        tasks.spawn(async move {
            let (mut missing, mut wrong) = (Vec::new(), Vec::new());
            for (k, v) in chunk {
                match client.get(k.clone()).await {
                    Ok(Some(got)) if got == v => {}
                    Ok(Some(got)) => wrong.push((k, got)),
                    Ok(None) => missing.push(k),
                    Err(e) => panic!("get {k:?}: {e}"),
                }
            }
            (missing, wrong)
        });
    }
    let (mut missing, mut wrong) = (Vec::new(), Vec::new());
    while let Some(r) = tasks.join_next().await {
        let (m, w) = r.expect("a reader task panicked");
        missing.extend(m);
        wrong.extend(w);
    }
    assert!(
        missing.is_empty() && wrong.is_empty(),
        "{} of {} acknowledged writes missing (first: {:?}), {} wrong (first: {:?})",
        missing.len(),
        expected.len(),
        missing.first(),
        wrong.len(),
        wrong.first()
    );
}

/// The value of `basalt_raft_snapshots_total{event="EVENT"}` on node `id`.
pub async fn snapshot_events(cluster: &LocalCluster, id: u64, event: &str) -> u64 {
    let addr = cluster.metrics_addr(id).expect("node exists");
    let text = basalt_bench::metrics_scrape::fetch_metrics(addr)
        .await
        .expect("metrics endpoint answers");
    let prefix = format!("basalt_raft_snapshots_total{{event=\"{event}\"}}");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse::<f64>().expect("a sample value is a number") as u64)
        .unwrap_or(0)
}

/// Waits until node `id` reports an applied index of at least `index`.
pub async fn wait_applied(cluster: &LocalCluster, id: u64, index: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut last = 0;
    loop {
        if let Ok(s) = cluster.cluster_status(id).await {
            last = s.header.map_or(0, |h| h.applied_index);
            if last >= index {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "node {id} applied only {last} of {index} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The leader's applied index, as the leader reports it.
pub async fn applied_index(cluster: &LocalCluster, id: u64) -> u64 {
    cluster
        .cluster_status(id)
        .await
        .expect("node answers status")
        .header
        .map_or(0, |h| h.applied_index)
}

/// The applied index of node `id`'s own replica of `shard`, as its shard listing reports it.
pub async fn shard_applied(cluster: &LocalCluster, id: u64, shard: u64) -> Option<u64> {
    let c = client_of(cluster.endpoint(id).ok()?).await;
    let shards = c.list_shards(Some("default"), true).await.ok()?;
    shards.into_iter().find(|s| s.id == shard).map(|s| s.applied_index)
}

/// Waits until node `id`'s replica of `shard` has applied at least `index`.
pub async fn wait_shard_applied(cluster: &LocalCluster, id: u64, shard: u64, index: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let last = shard_applied(cluster, id, shard).await.unwrap_or(0);
        if last >= index {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {id} applied only {last} of {index} of shard {shard} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
