//! Shard merges against real `basaltd` processes: a range keyspace split into three shards is
//! merged back into one while writers keep writing to every shard, and a merge of a shard too
//! large to merge is refused and undone.
//!
//! What a merge must never do shows up here as a failed or lost write: a writer whose request is
//! in flight while its shard freezes must get its answer (the client retries the `WrongShard`
//! answers until the merged shard serves the key, within its default deadline), and every write
//! it was told succeeded must read back afterwards, also from a node restarted after the merge.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use basalt_bench::local_cluster::LocalCluster;
use basalt_client::{Client, ClientConfig, ClientError, Sharding};
use bytes::Bytes;
use common::{client, client_of, start_cluster, verify, write_keys, Load};

/// Retries `f` until it succeeds or 30 s pass (new shards elect leaders, views catch up).
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
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

/// The groups node `id` hosts, from its `basalt_raft{group=..}` metrics.
async fn hosted_groups(cluster: &LocalCluster, id: u64) -> Result<Vec<u64>, String> {
    let addr = cluster.metrics_addr(id).map_err(|e| e.to_string())?;
    let text = basalt_bench::metrics_scrape::fetch_metrics(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut groups: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("basalt_raft{"))
        .filter_map(|l| l.split("group=\"").nth(1)?.split('"').next()?.parse().ok())
        .collect();
    groups.sort_unstable();
    groups.dedup();
    Ok(groups)
}

/// The shards of `keyspace` once the answering node's catalog shows `count` of them (a node's
/// catalog may trail the meta leader's by the latest change).
async fn settled_shards(admin: &Client, keyspace: &str, count: usize) -> Vec<basalt_proto::v1::Shard> {
    eventually("the catalog shows the merge", || async {
        let shards = admin
            .list_shards(Some(keyspace), false)
            .await
            .map_err(|e| e.to_string())?;
        match shards.len() == count {
            true => Ok(shards),
            false => Err(format!("{shards:?}")),
        }
    })
    .await
}

async fn keyspace_client(cluster: &LocalCluster, deadline: Duration, keyspace: &str) -> Client {
    client(cluster, deadline).await.with_keyspace(keyspace)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_range_shards_merge_back_into_one_while_writers_run() {
    let (cluster, _) = start_cluster(3, None).await;
    let admin = client(&cluster, Duration::from_secs(30)).await;
    admin
        .create_keyspace("events", Sharding::Range, 1, 3)
        .await
        .expect("create the range keyspace");
    let c = admin.with_keyspace("events");
    eventually("first write", || async {
        c.put("a-probe", "1").await.map_err(|e| e.to_string())
    })
    .await;
    let mut expected = write_keys(&c, "k", 300).await;
    expected.insert(Bytes::from("a-probe"), Bytes::from("1"));
    let first = admin.list_shards(Some("events"), false).await.expect("list");
    admin
        .split_shard(first[0].id, Some(Bytes::from("k-000100")))
        .await
        .expect("split at k-000100");
    let right = admin.list_shards(Some("events"), false).await.expect("list")[1].id;
    eventually("split at k-000200", || async {
        admin
            .split_shard(right, Some(Bytes::from("k-000200")))
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    let before = admin.list_shards(Some("events"), false).await.expect("list");
    assert_eq!(before.len(), 3, "{before:?}");

    // Writers on every shard ("a-..." and "k-00015-..." sort before and between the split points,
    // "z-..." after them), with the client's default deadline: none of their writes may fail.
    let writers = keyspace_client(&cluster, ClientConfig::DEFAULT_DEADLINE, "events").await;
    let loads = [
        Load::start(&writers, 2, "a"),
        Load::start(&writers, 2, "k-00015"),
        Load::start(&writers, 2, "z"),
    ];
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Merge the last two, then the first with the result: back to one shard.
    let merged = admin
        .merge_shard(before[1].id)
        .await
        .expect("merge the second shard with the third");
    assert_eq!((merged.shard.id, merged.absorbed), (before[1].id, before[2].id));
    assert_eq!(
        (merged.shard.start.clone(), merged.shard.end.clone()),
        (before[1].start.clone(), before[2].end.clone())
    );
    assert!(merged.shard.epoch > before[1].epoch.max(before[2].epoch), "{merged:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last = admin
        .merge_shard(before[0].id)
        .await
        .expect("merge the first shard with the rest");
    assert_eq!((last.shard.id, last.absorbed), (before[0].id, before[1].id));
    assert!(last.shard.epoch > merged.shard.epoch, "{last:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut acked = 0;
    for load in loads {
        let r = load.finish().await;
        assert_eq!(r.unknown, 0, "a write failed while shards merged under it");
        acked += r.acked.len();
        expected.extend(r.acked);
    }
    assert!(acked > 0, "the writers wrote nothing");

    let after = settled_shards(&admin, "events", 1).await;
    assert_eq!((after[0].id, after[0].epoch), (before[0].id, last.shard.epoch));
    assert_eq!(
        (after[0].start.clone(), after[0].end.clone()),
        (before[0].start.clone(), before[2].end.clone())
    );
    verify(&c, &expected).await;

    // Every node forgets the merged-away groups, and its catalog lists the one shard.
    let gone = [before[1].id, before[2].id];
    for id in cluster.node_ids() {
        eventually("the merged-away groups leave every node", || async {
            let groups = hosted_groups(&cluster, id).await?;
            match groups.contains(&before[0].id) && !gone.iter().any(|g| groups.contains(g)) {
                true => Ok(()),
                false => Err(format!("node {id} hosts {groups:?}")),
            }
        })
        .await;
        let node = client_of(cluster.endpoint(id).expect("node exists")).await;
        eventually("every node's catalog lists one shard", || async {
            let listed = node
                .list_shards(Some("events"), false)
                .await
                .map_err(|e| e.to_string())?;
            match listed.iter().map(|s| s.id).collect::<Vec<_>>() == [before[0].id] {
                true => Ok(()),
                false => Err(format!("node {id} lists {listed:?}")),
            }
        })
        .await;
    }

    // A node killed and restarted after the merge comes back with the merged shard alone and all
    // its data.
    let restarted = cluster.node_ids()[1];
    cluster.kill(restarted).expect("kill a node");
    cluster.restart(restarted).await.expect("restart it");
    let groups = hosted_groups(&cluster, restarted).await.expect("metrics");
    assert!(!gone.iter().any(|g| groups.contains(g)), "{groups:?}");
    let local = client_of(cluster.endpoint(restarted).expect("node exists")).await;
    let want = expected.len() as u64;
    eventually("the restarted node's replica holds every key", || async {
        let shards = local
            .list_shards(Some("events"), true)
            .await
            .map_err(|e| e.to_string())?;
        match shards.as_slice() {
            [s] if s.approximate_keys == want => Ok(()),
            other => Err(format!("{other:?}, want {want} keys")),
        }
    })
    .await;
    verify(&c, &expected).await;
    cluster.terminate_all().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_too_large_to_merge_is_refused_and_keeps_serving() {
    let (cluster, _) = start_cluster(3, None).await;
    let admin = client(&cluster, Duration::from_secs(30)).await;
    admin
        .create_keyspace("blobs", Sharding::Range, 1, 3)
        .await
        .expect("create the range keyspace");
    let c = admin.with_keyspace("blobs");
    eventually("first write", || async {
        c.put("a", "1").await.map_err(|e| e.to_string())
    })
    .await;
    let first = admin.list_shards(Some("blobs"), false).await.expect("list");
    admin
        .split_shard(first[0].id, Some(Bytes::from("m")))
        .await
        .expect("split at m");
    // 10 MiB behind the split point: more than a merge may carry.
    let mut expected = BTreeMap::new();
    let value = Bytes::from(vec![b'x'; 512 << 10]);
    for n in 0..20 {
        let key = Bytes::from(format!("n-{n:02}"));
        eventually("a large write", || async {
            c.put(key.clone(), value.clone()).await.map_err(|e| e.to_string())
        })
        .await;
        expected.insert(key, value.clone());
    }
    let before = admin.list_shards(Some("blobs"), false).await.expect("list");
    assert_eq!(before.len(), 2);

    let err = admin.merge_shard(before[0].id).await.expect_err("too large");
    match &err {
        ClientError::Server { code, message } => {
            assert_eq!(*code, tonic::Code::FailedPrecondition, "{err:?}");
            assert!(message.contains("bytes"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // Both shards remain, unmarked; the right one was unfrozen (two epochs on) and takes writes.
    let after = eventually("the refused merge is unmarked everywhere", || async {
        let after = admin
            .list_shards(Some("blobs"), false)
            .await
            .map_err(|e| e.to_string())?;
        match after.get(1) {
            Some(r) if r.epoch == before[1].epoch + 2 => Ok(after),
            _ => Err(format!("{after:?}")),
        }
    })
    .await;
    assert_eq!(
        after.iter().map(|s| s.id).collect::<Vec<_>>(),
        before.iter().map(|s| s.id).collect::<Vec<_>>()
    );
    assert_eq!(after[0].epoch, before[0].epoch, "the left shard was not touched");
    assert_eq!(after[1].epoch, before[1].epoch + 2, "frozen, then unfrozen");
    c.put("n-new", "after the refused merge")
        .await
        .expect("the right shard takes writes");
    expected.insert(Bytes::from("n-new"), Bytes::from("after the refused merge"));
    verify(&c, &expected).await;
    cluster.terminate_all().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn neighbouring_hash_shards_merge_and_keep_every_key() {
    let (cluster, _) = start_cluster(3, None).await;
    let admin = client(&cluster, Duration::from_secs(30)).await;
    admin
        .create_keyspace("users", Sharding::Hash, 4, 3)
        .await
        .expect("create the hash keyspace");
    let c = admin.with_keyspace("users");
    eventually("first write", || async {
        c.put("probe", "1").await.map_err(|e| e.to_string())
    })
    .await;
    let mut expected = write_keys(&c, "user", 400).await;
    expected.insert(Bytes::from("probe"), Bytes::from("1"));
    let before = admin.list_shards(Some("users"), false).await.expect("list");
    assert_eq!(before.len(), 4);

    // The last two hash ranges become one; the other shards are untouched.
    let merged = admin.merge_shard(before[2].id).await.expect("merge");
    assert_eq!(merged.absorbed, before[3].id);
    assert_eq!(
        (merged.shard.start_display.as_str(), merged.shard.end_display.as_str()),
        (before[2].start_display.as_str(), before[3].end_display.as_str())
    );
    let after = settled_shards(&admin, "users", 3).await;
    assert_eq!(
        after.iter().map(|s| (s.id, s.epoch)).collect::<Vec<_>>(),
        [
            (before[0].id, before[0].epoch),
            (before[1].id, before[1].epoch),
            (before[2].id, merged.shard.epoch)
        ]
    );
    assert!(after.windows(2).all(|w| w[0].end == w[1].start), "{after:?}");
    verify(&c, &expected).await;

    // A whole scan of a hash keyspace visits every shard: every key, once.
    let mut seen = BTreeMap::new();
    let mut cursor = None;
    loop {
        let page = c
            .scan_from_cursor(Bytes::new(), None, 1000, cursor.clone())
            .await
            .expect("scan");
        for (k, v) in page.kvs {
            assert!(seen.insert(k, v).is_none(), "a key scanned twice");
        }
        if !page.more {
            break;
        }
        cursor = page.cursor;
    }
    assert_eq!(seen, expected);
    for id in cluster.node_ids() {
        eventually("the merged-away group leaves every node", || async {
            let groups = hosted_groups(&cluster, id).await?;
            match groups.contains(&before[3].id) {
                false => Ok(()),
                true => Err(format!("node {id} hosts {groups:?}")),
            }
        })
        .await;
    }
    cluster.terminate_all().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_down_during_a_merge_catches_up_and_drops_the_absorbed_shard() {
    // Snapshots every 50 entries, so the merge entry is compacted away before the node returns.
    let (cluster, _) = start_cluster(3, Some(50)).await;
    let admin = client(&cluster, Duration::from_secs(30)).await;
    admin
        .create_keyspace("events", Sharding::Range, 1, 3)
        .await
        .expect("create the range keyspace");
    let c = admin.with_keyspace("events");
    eventually("first write", || async {
        c.put("a-probe", "1").await.map_err(|e| e.to_string())
    })
    .await;
    let mut expected = write_keys(&c, "k", 100).await;
    expected.insert(Bytes::from("a-probe"), Bytes::from("1"));
    let first = admin.list_shards(Some("events"), false).await.expect("list");
    admin
        .split_shard(first[0].id, Some(Bytes::from("k-000050")))
        .await
        .expect("split");
    let before = settled_shards(&admin, "events", 2).await;

    let down = cluster.node_ids()[2];
    cluster.kill(down).expect("kill a node");
    let merged = admin.merge_shard(before[0].id).await.expect("merge without one node");
    assert_eq!(merged.absorbed, before[1].id);
    expected.extend(write_keys(&c, "after", 200).await);

    cluster.restart(down).await.expect("restart it");
    let local = client_of(cluster.endpoint(down).expect("node exists")).await;
    let want = expected.len() as u64;
    eventually("the returning node holds the merged shard with every key", || async {
        let shards = local
            .list_shards(Some("events"), true)
            .await
            .map_err(|e| e.to_string())?;
        match shards.as_slice() {
            [s] if s.id == before[0].id && s.approximate_keys == want => Ok(()),
            other => Err(format!("{other:?}, want {want} keys")),
        }
    })
    .await;
    eventually("the returning node drops the absorbed shard", || async {
        let groups = hosted_groups(&cluster, down).await?;
        match groups.contains(&before[1].id) {
            false => Ok(()),
            true => Err(format!("node {down} hosts {groups:?}")),
        }
    })
    .await;
    verify(&c, &expected).await;
    cluster.terminate_all().await.expect("clean shutdown");
}
