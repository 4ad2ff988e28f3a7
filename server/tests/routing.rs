//! The client's shard routing cache against real `basaltd` processes: requests to a 16-shard
//! hash keyspace go straight to the leader of their shard (as the client sees it and as the
//! servers' forwarding counters confirm), and a range keyspace that splits repeatedly under a
//! write and read load serves every request without a single user-visible failure.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use basalt_bench::local_cluster::LocalCluster;
use basalt_client::{Client, ClientError, RoutingStats, Sharding};
use bytes::Bytes;
use common::{client, start_cluster, verify, write_keys, Load};

/// Retries `f` until it succeeds (a new keyspace's shards elect their leaders in about a second).
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "{what}: retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// Waits until the catalog lists `count` shards of `keyspace`, each with a leader.
async fn shards_led(admin: &Client, keyspace: &str, count: usize) {
    eventually("every shard has a leader", || async {
        let shards = admin.list_shards(Some(keyspace), false).await?;
        if shards.len() == count && shards.iter().all(|s| s.leader_id != 0) {
            Ok(())
        } else {
            Err(ClientError::Server {
                code: tonic::Code::Unavailable,
                message: format!(
                    "leaders: {:?}",
                    shards.iter().map(|s| (s.id, s.leader_id)).collect::<Vec<_>>()
                ),
            })
        }
    })
    .await
}

/// Requests the nodes forwarded to a leader, summed over the cluster (`methods` of the Kv
/// service, from `basalt_requests_forwarded_total`).
async fn forwarded(cluster: &LocalCluster, methods: &[&str]) -> u64 {
    let mut total = 0;
    for id in cluster.node_ids() {
        let addr = cluster.metrics_addr(id).expect("node exists");
        let text = basalt_bench::metrics_scrape::fetch_metrics(addr)
            .await
            .expect("metrics endpoint answers");
        for method in methods {
            let prefix = format!("basalt_requests_forwarded_total{{method=\"{method}\"}}");
            total += text.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |v| {
                v.trim().parse::<f64>().expect("a sample value is a number") as u64
            });
        }
    }
    total
}

/// `after - before`, counter by counter.
fn delta(after: RoutingStats, before: RoutingStats) -> RoutingStats {
    RoutingStats {
        hits: after.hits - before.hits,
        misses: after.misses - before.misses,
        fallbacks: after.fallbacks - before.fallbacks,
        refreshes: after.refreshes - before.refreshes,
        refresh_failures: after.refresh_failures - before.refresh_failures,
        wrong_shard: after.wrong_shard - before.wrong_shard,
        descriptor_updates: after.descriptor_updates - before.descriptor_updates,
        leader_updates: after.leader_updates - before.leader_updates,
        answered_by_target: after.answered_by_target - before.answered_by_target,
        answered_elsewhere: after.answered_elsewhere - before.answered_elsewhere,
        evictions: after.evictions - before.evictions,
    }
}

/// The share of successful routed requests that the node the cache chose served itself.
fn direct_share(d: &RoutingStats) -> f64 {
    d.answered_by_target as f64 / (d.answered_by_target + d.answered_elsewhere).max(1) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_to_a_16_shard_hash_keyspace_reach_their_shard_leader_first() {
    let (cluster, _) = start_cluster(3, None).await;
    let admin = client(&cluster, Duration::from_secs(20)).await;
    admin
        .create_keyspace("users", Sharding::Hash, 16, 3)
        .await
        .expect("create the hash keyspace");
    shards_led(&admin, "users", 16).await;
    let c = admin.with_keyspace("users");
    eventually("first write", || c.put("probe", "1")).await;
    // Warm up: the cache fills, and leaders that were still settling move once more at most.
    write_keys(&c, "warm", 200).await;

    let stats_before = c.routing_stats();
    let forwarded_before = forwarded(&cluster, &["put", "get"]).await;
    let expected = write_keys(&c, "user", 2_000).await;
    verify(&c, &expected).await;
    let d = delta(c.routing_stats(), stats_before);
    let forwards = forwarded(&cluster, &["put", "get"]).await - forwarded_before;
    let requests = 2 * expected.len() as u64;
    eprintln!(
        "16-shard hash keyspace, {requests} requests: {:.1}% served by the node the cache chose, \
         {forwards} forwarded by servers; {d:?}",
        100.0 * direct_share(&d)
    );
    assert!(
        (d.answered_by_target + d.answered_elsewhere) * 100 >= requests * 99,
        "nearly every request went where the cache said: {d:?}"
    );
    assert!(
        direct_share(&d) >= 0.9,
        "most requests reach their shard's leader first: {d:?}"
    );
    assert!(
        forwards * 10 <= requests,
        "the servers forwarded {forwards} of {requests} requests"
    );
    assert!(d.fallbacks * 100 <= requests, "{d:?}");
    // The cache spans the keyspace without overlaps.
    let cached = c.cached_shards("users").expect("routes cached");
    assert_eq!(cached.len(), 16, "{cached:?}");
    assert!(cached.windows(2).all(|w| w[0].end == w[1].start), "{cached:?}");
    cluster.terminate_all().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_range_keyspace_splitting_under_load_fails_no_request() {
    let (cluster, _) = start_cluster(3, None).await;
    let admin = client(&cluster, Duration::from_secs(20)).await;
    admin
        .create_keyspace("events", Sharding::Range, 1, 3)
        .await
        .expect("create the range keyspace");
    shards_led(&admin, "events", 1).await;
    let c = admin.with_keyspace("events");
    eventually("first write", || c.put("a-probe", "1")).await;

    // Eight writers (keys `load-wNN-…`) and a reader (point reads and short scans of the same
    // keys) run throughout; every error they see is a failure of the routing layer.
    let load = Load::start(&c, 8, "load");
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, read_errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reader = {
        let (c, stop, reads, read_errors) = (c.clone(), stop.clone(), reads.clone(), read_errors.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            let mut first_error = None;
            while !stop.load(Ordering::Relaxed) {
                let key = Bytes::from(format!("load-w{:02}-{:06}", n % 8, n / 8));
                let result = if n.is_multiple_of(10) {
                    c.scan(key, None, 20).await.map(|_| ())
                } else {
                    c.get(key).await.map(|_| ())
                };
                reads.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = result {
                    read_errors.fetch_add(1, Ordering::Relaxed);
                    first_error.get_or_insert(e);
                }
                n += 1;
            }
            first_error
        })
    };

    // Split the one shard three times while the load runs: at writer 4's keys, then each half
    // again, by its median.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let shards = admin.list_shards(Some("events"), false).await.expect("list");
    let split = eventually("first split", || {
        admin.split_shard(shards[0].id, Some(Bytes::from("load-w04")))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    eventually("split the lower half", || admin.split_shard(split.left.id, None)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    eventually("split the upper half", || admin.split_shard(split.right.id, None)).await;
    // Let the load run on the final layout too.
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let result = load.finish().await;
    stop.store(true, Ordering::Relaxed);
    let first_read_error = reader.await.expect("reader task");
    let stats = c.routing_stats();
    eprintln!(
        "range keyspace split 3 times under load: {} writes acknowledged, {} failed; {} reads, {} \
         failed; {stats:?}",
        result.acked.len(),
        result.unknown,
        reads.load(Ordering::Relaxed),
        read_errors.load(Ordering::Relaxed)
    );
    assert_eq!(result.unknown, 0, "no write may fail while shards split");
    assert_eq!(
        read_errors.load(Ordering::Relaxed),
        0,
        "no read may fail while shards split: {first_read_error:?}"
    );
    assert!(
        result.acked.len() > 100,
        "the load made progress: {}",
        result.acked.len()
    );
    assert!(stats.refreshes >= 2, "the cache noticed the splits: {stats:?}");
    verify(&c, &result.acked).await;

    // Once settled, the cache holds the four shards and requests go straight to their leaders.
    shards_led(&admin, "events", 4).await;
    let sample: Vec<Bytes> = result.acked.keys().step_by(7).cloned().collect();
    // One pass lets the cache catch up with the final layout (forwarded answers may have made a
    // lookup due; it runs once a second at most), then a measured pass.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    for k in &sample {
        c.get(k.clone()).await.expect("get");
    }
    let before = c.routing_stats();
    for k in &sample {
        c.get(k.clone()).await.expect("get");
    }
    let d = delta(c.routing_stats(), before);
    eprintln!(
        "after the splits: {:.1}% of {} reads served by the node the cache chose; {d:?}",
        100.0 * direct_share(&d),
        sample.len()
    );
    assert!(direct_share(&d) >= 0.9, "{d:?}");
    // The cache spans the keyspace without overlaps, and each entry is a shard of the catalog
    // or an ancestor of consecutive ones: a split whose halves share a leader changes nothing
    // for routing, so the client need not have heard of it.
    let cached = c.cached_shards("events").expect("routes cached");
    let catalog = admin.list_shards(Some("events"), false).await.expect("list");
    assert!(cached.windows(2).all(|w| w[0].end == w[1].start), "{cached:?}");
    assert_eq!(cached.first().map(|s| &s.start), catalog.first().map(|s| &s.start));
    assert_eq!(cached.last().map(|s| &s.end), catalog.last().map(|s| &s.end));
    for entry in &cached {
        let inside: Vec<_> = catalog
            .iter()
            .filter(|s| s.start >= entry.start && s.end <= entry.end)
            .collect();
        assert!(
            inside.first().is_some_and(|s| s.start == entry.start)
                && inside.last().is_some_and(|s| s.end == entry.end)
                && inside.iter().all(|s| s.epoch >= entry.epoch),
            "cached {entry:?} is not made of catalog shards {catalog:?}"
        );
    }
    cluster.terminate_all().await.expect("clean shutdown");
}
