//! Per-shard load and size as this node sees them: what the node reports to the placement
//! driver, which splits shards that grow too big or too busy.
//!
//! - **Load** is a count of requests routed to each local replica (on a follower that forwards,
//!   and again on the leader that serves it; the driver reads the leader's count). The count is
//!   an atomic increment on the request path; [`LoadTracker::rates`] turns counts into rates
//!   between two reports.
//! - **Size** is the bytes and keys of a shard's data, counted by scanning the local replica, up
//!   to a cap (the driver only needs to know "over the split threshold"), and only again when
//!   the replica has applied something since the last count and [`SIZE_REFRESH`] has passed. A
//!   scan is the honest measure for the shard sizes this store targets today; RocksDB's
//!   approximate-size properties would replace it for very large shards.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_consensus::StateReader;
use basalt_storage::{ShardScan, ShardState};
use parking_lot::{Mutex, RwLock};

/// Least time between two size counts of one shard.
pub const SIZE_REFRESH: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct LoadTracker {
    requests: RwLock<HashMap<u64, Arc<AtomicU64>>>,
    last_rates: Mutex<Option<(Instant, HashMap<u64, u64>)>>,
    sizes: Mutex<HashMap<u64, SizeCount>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardSize {
    pub bytes: u64,
    pub keys: u64,
}

struct SizeCount {
    applied_index: u64,
    epoch: u64,
    at: Instant,
    size: ShardSize,
}

impl LoadTracker {
    /// Counts one request served by the local replica of `group`.
    pub fn record(&self, group: u64) {
        if let Some(c) = self.requests.read().get(&group) {
            c.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.requests
            .write()
            .entry(group)
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Requests per second per group since the previous call (nothing on the first call).
    pub fn rates(&self) -> HashMap<u64, f64> {
        let now = Instant::now();
        let counts: HashMap<u64, u64> = self
            .requests
            .read()
            .iter()
            .map(|(g, c)| (*g, c.load(Ordering::Relaxed)))
            .collect();
        let mut last = self.last_rates.lock();
        let rates = match last.as_ref() {
            Some((then, before)) => {
                let secs = now.duration_since(*then).as_secs_f64().max(1e-3);
                counts
                    .iter()
                    .map(|(g, c)| (*g, c.saturating_sub(before.get(g).copied().unwrap_or(0)) as f64 / secs))
                    .collect()
            }
            None => HashMap::new(),
        };
        *last = Some((now, counts));
        rates
    }

    /// The size of the local replica's shard, counted up to `cap` bytes (a count that reached
    /// the cap reports the cap).
    pub fn size(&self, group: u64, reader: &StateReader, cap: u64) -> ShardSize {
        let applied = reader.applied_index();
        let shard = reader.shard();
        if let Some(c) = self.sizes.lock().get(&group) {
            let fresh = c.applied_index == applied || c.at.elapsed() < SIZE_REFRESH;
            if fresh && c.epoch == shard.epoch {
                return c.size;
            }
        }
        let size = count(reader, &shard, cap);
        self.sizes.lock().insert(
            group,
            SizeCount {
                applied_index: applied,
                epoch: shard.epoch,
                at: Instant::now(),
                size,
            },
        );
        size
    }

    /// Forgets a replica this node no longer holds.
    pub fn forget(&self, group: u64) {
        self.requests.write().remove(&group);
        self.sizes.lock().remove(&group);
    }
}

fn count(reader: &StateReader, shard: &ShardState, cap: u64) -> ShardSize {
    let mut size = ShardSize::default();
    let mut cursor = Some(shard.start.clone());
    while let Some(c) = cursor {
        let scan = ShardScan {
            cursor: Some(c),
            ..Default::default()
        };
        let Ok(page) = reader.scan_shard(&scan) else { break };
        size.keys += page.kvs.len() as u64;
        size.bytes += page.kvs.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum::<u64>();
        if size.bytes >= cap {
            size.bytes = cap;
            break;
        }
        cursor = page.cursor.filter(|c| shard.contains(c));
    }
    size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_counts_between_two_calls_over_the_time_between_them() {
        let t = LoadTracker::default();
        t.record(7);
        assert!(t.rates().is_empty(), "the first call only sets the baseline");
        for _ in 0..50 {
            t.record(7);
        }
        t.record(9);
        std::thread::sleep(Duration::from_millis(100));
        let r = t.rates();
        assert!(r[&7] > 50.0 && r[&7] <= 500.0, "{r:?}");
        assert!(r[&9] > 0.0 && r[&9] < r[&7], "{r:?}");
        t.forget(7);
        assert!(!t.rates().contains_key(&7));
    }
}
