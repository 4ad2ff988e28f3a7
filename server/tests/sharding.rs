//! Sharding against real `basaltd` processes: a hash keyspace spread over 16 shards, a range
//! keyspace split by hand while it serves, scans across shard boundaries, and dropping a keyspace.

mod common;

use std::time::Duration;

use basalt_client::{Client, Sharding};
use bytes::Bytes;
use common::{client, start_cluster, write_keys};

/// Retries `f` until it succeeds: a new keyspace's shards elect their leaders in about a second.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, basalt_client::ClientError>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
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

async fn scan_all(c: &Client) -> Vec<(Bytes, Bytes)> {
    let mut out = Vec::new();
    let mut cursor = None;
    loop {
        let page = c
            .scan_from_cursor(Bytes::new(), None, 1000, cursor.clone())
            .await
            .expect("scan");
        out.extend(page.kvs);
        if !page.more {
            return out;
        }
        cursor = page.cursor;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hash_keyspace_spreads_keys_evenly_over_16_shards() {
    let (cluster, _) = start_cluster(3, None).await;
    let admin = client(&cluster, Duration::from_secs(20)).await;
    let ks = admin
        .create_keyspace("users", Sharding::Hash, 16, 3)
        .await
        .expect("create the hash keyspace");
    assert_eq!(ks.initial_shards, 16);
    let c = admin.with_keyspace("users");
    eventually("first write", || c.put("probe", "1")).await;
    let expected = write_keys(&c, "user", 16_000).await;

    // The figures come from the answering node's own replicas, which may trail their leaders by
    // the last few writes: wait until they have all of them.
    let want = expected.len() as u64 + 1;
    let counts: Vec<u64> = eventually("every replica applied every write", || async {
        let shards = admin.list_shards(Some("users"), true).await?;
        assert_eq!(shards.len(), 16, "{shards:?}");
        let counts: Vec<u64> = shards.iter().map(|s| s.approximate_keys).collect();
        if counts.iter().sum::<u64>() == want {
            Ok(counts)
        } else {
            Err(basalt_client::ClientError::Server {
                code: tonic::Code::Unavailable,
                message: format!("{} of {want} keys applied: {counts:?}", counts.iter().sum::<u64>()),
            })
        }
    })
    .await;
    let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
    assert!(
        *max as f64 <= 1.2 * *min as f64,
        "largest shard {max} keys, smallest {min}: {counts:?}"
    );

    // A scan of a hash keyspace visits every shard (hash order) and returns every key once.
    let all = scan_all(&c).await;
    assert_eq!(all.len(), expected.len() + 1);
    for (k, v) in &expected {
        assert_eq!(c.get(k.clone()).await.expect("get").as_ref(), Some(v));
    }
    // Keyspaces are separate: the default keyspace does not see these keys.
    assert_eq!(admin.get("user-000001").await.expect("get"), None);

    admin.drop_keyspace("users").await.expect("drop");
    let names: Vec<String> = admin
        .list_keyspaces()
        .await
        .expect("list")
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert!(!names.contains(&"users".to_string()), "{names:?}");
    cluster.terminate_all().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_range_shard_split_while_serving_keeps_every_key_and_scans_in_order() {
    let (cluster, _) = start_cluster(3, None).await;
    let admin = client(&cluster, Duration::from_secs(20)).await;
    admin
        .create_keyspace("events", Sharding::Range, 1, 3)
        .await
        .expect("create the range keyspace");
    let c = admin.with_keyspace("events");
    eventually("first write", || c.put("a-probe", "1")).await;
    let mut expected = write_keys(&c, "k", 400).await;
    expected.insert(Bytes::from("a-probe"), Bytes::from("1"));

    let shards = admin.list_shards(Some("events"), false).await.expect("list");
    assert_eq!(shards.len(), 1);
    // Writers keep going while the shard splits under them; none of their writes may fail.
    let writer = {
        let c = c.clone();
        tokio::spawn(async move { write_keys(&c, "during", 300).await })
    };
    let split = admin
        .split_shard(shards[0].id, Some(Bytes::from("k-000200")))
        .await
        .expect("split at k-000200");
    assert_eq!(split.left.end_display, "k-000200");
    assert_eq!(split.right.start_display, "k-000200");
    assert!(split.left.epoch > shards[0].epoch);
    expected.extend(writer.await.expect("writer task"));

    // The new half splits again, by its median this time.
    let right = split.right.id;
    eventually("split the new shard", || admin.split_shard(right, None)).await;
    let shards = admin.list_shards(Some("events"), false).await.expect("list");
    assert_eq!(shards.len(), 3, "{shards:?}");
    assert!(shards.windows(2).all(|w| w[0].end == w[1].start), "{shards:?}");

    let all = scan_all(&c).await;
    let keys: Vec<&Bytes> = all.iter().map(|(k, _)| k).collect();
    let want: Vec<&Bytes> = expected.keys().collect();
    assert_eq!(
        keys, want,
        "a range scan returns every key, in order, across the shards"
    );
    for (k, v) in &expected {
        assert_eq!(c.get(k.clone()).await.expect("get").as_ref(), Some(v));
    }
    cluster.terminate_all().await.expect("clean shutdown");
}
