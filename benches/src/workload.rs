//! The closed-loop workload of `basalt-bench`: key generation, operation choice, preloading and
//! the measured run.
//!
//! Closed loop: each of `clients` tasks issues one operation, waits for its outcome, and issues
//! the next, so offered load adapts to the server and latency is what a synchronous caller sees.
//! The tasks share `connections` [`Client`]s round-robin (task `i` uses client `i % M`), which is
//! how one tests many requests multiplexed over few HTTP/2 connections versus many connections.
//!
//! Invariants, and why:
//! - Keys are `bench/` followed by the index in ten zero-padded digits, so byte order equals
//!   numeric order (scans over a range of indices are ranges of keys) and every key has the same
//!   size. [`KeySpace::new`] refuses counts that would need an eleventh digit.
//! - An operation is measured only if it both started and finished inside the measurement
//!   window ([`Window::counts`]): operations begun during warm-up, and the stragglers still in
//!   flight when the window closes, would otherwise bias both throughput and latency.
//! - Every task draws from its own seeded RNG, so a run's sequence of operations is reproducible
//!   from the seed in the report (timing, of course, is not).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_client::{Client, ClientError};
use bytes::Bytes;
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

/// Highest latency the histograms track; the client's own deadline (10 s by default) ends any
/// operation long before this, so nothing is clipped in practice.
const MAX_TRACKED_LATENCY_US: u64 = 60_000_000;
const KEY_PREFIX: &str = "bench/";
const KEY_DIGITS: usize = 10;

#[derive(thiserror::Error, Debug)]
pub enum WorkloadError {
    #[error("the read ratio must be within 0.0..=1.0, got {0}")]
    ReadRatio(f64),
    #[error("the key count must be within 1..={max}, got {got}", max = KeySpace::MAX_KEYS)]
    KeyCount { got: u64 },
    #[error("preloading key {key}: {source}")]
    Preload {
        key: String,
        #[source]
        source: ClientError,
    },
    #[error("a workload task panicked or was cancelled: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What the clients do.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Workload {
    Put,
    Get,
    /// Each operation is a get with probability `read_ratio`, otherwise a put.
    Mixed {
        read_ratio: f64,
    },
}

impl Workload {
    /// A mixed workload; the ratio is validated here so a [`Workload`] is always meaningful.
    pub fn mixed(read_ratio: f64) -> Result<Self, WorkloadError> {
        if (0.0..=1.0).contains(&read_ratio) {
            Ok(Workload::Mixed { read_ratio })
        } else {
            Err(WorkloadError::ReadRatio(read_ratio))
        }
    }

    pub fn read_ratio(self) -> f64 {
        match self {
            Workload::Put => 0.0,
            Workload::Get => 1.0,
            Workload::Mixed { read_ratio } => read_ratio,
        }
    }

    /// Reads of absent keys would measure a different code path, so any workload that reads
    /// writes every key first.
    pub fn needs_preload(self) -> bool {
        self.read_ratio() > 0.0
    }

    pub fn name(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::Get => "get",
            Workload::Mixed { .. } => "mixed",
        }
    }
}

/// The keys a run touches: `count` fixed-width keys (see the module invariants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeySpace {
    count: u64,
}

impl KeySpace {
    pub const MAX_KEYS: u64 = 10_000_000_000;

    pub fn new(count: u64) -> Result<Self, WorkloadError> {
        if (1..=Self::MAX_KEYS).contains(&count) {
            Ok(KeySpace { count })
        } else {
            Err(WorkloadError::KeyCount { got: count })
        }
    }

    pub fn count(self) -> u64 {
        self.count
    }

    /// The key with `index` (`index < count`).
    pub fn key(self, index: u64) -> Bytes {
        debug_assert!(index < self.count, "key index {index} out of range");
        Bytes::from(format!("{KEY_PREFIX}{index:0KEY_DIGITS$}"))
    }
}

/// One operation of the workload, naming its key by index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Get(u64),
    Put(u64),
}

/// Chooses operations: keys uniformly, reads with the workload's read ratio.
#[derive(Clone, Copy, Debug)]
pub struct OpPicker {
    read_ratio: f64,
    keys: KeySpace,
}

impl OpPicker {
    pub fn new(workload: Workload, keys: KeySpace) -> Self {
        OpPicker {
            read_ratio: workload.read_ratio(),
            keys,
        }
    }

    pub fn next(&self, rng: &mut impl Rng) -> Op {
        let index = rng.random_range(0..self.keys.count);
        // `random::<f64>()` lies in [0, 1): a ratio of 1.0 always reads, 0.0 never does.
        if rng.random::<f64>() < self.read_ratio {
            Op::Get(index)
        } else {
            Op::Put(index)
        }
    }
}

/// A value of `size` random bytes. Random, so that no compression anywhere flatters the numbers.
pub fn value_of_size(size: usize, seed: u64) -> Bytes {
    let mut value = vec![0u8; size];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut value);
    Bytes::from(value)
}

/// The measurement window of a run: warm-up until `measure_from`, measurement until `until`.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub measure_from: Instant,
    pub until: Instant,
}

impl Window {
    pub fn starting_now(warmup: Duration, duration: Duration) -> Self {
        let measure_from = Instant::now() + warmup;
        Window {
            measure_from,
            until: measure_from + duration,
        }
    }

    pub fn measured(&self) -> Duration {
        self.until - self.measure_from
    }

    /// Whether an operation that ran from `started` to `finished` is part of the measurement.
    pub fn counts(&self, started: Instant, finished: Instant) -> bool {
        started >= self.measure_from && finished <= self.until
    }
}

/// Everything one run needs besides the clients.
#[derive(Clone, Debug)]
pub struct LoadPlan {
    pub workload: Workload,
    pub keys: KeySpace,
    pub value: Bytes,
    /// Concurrent closed-loop tasks.
    pub clients: usize,
    pub seed: u64,
}

/// What a run measured.
#[derive(Debug)]
pub struct LoadOutcome {
    /// Latency of each successful measured operation, in microseconds.
    pub latency_us: Histogram<u64>,
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub measured: Duration,
}

impl LoadOutcome {
    fn empty(measured: Duration) -> Self {
        LoadOutcome {
            latency_us: Histogram::new_with_bounds(1, MAX_TRACKED_LATENCY_US, 3)
                .expect("constant histogram bounds are valid: 1 <= low, high >= 2 * low, 3 sig figs"),
            ops: 0,
            errors: 0,
            first_error: None,
            measured,
        }
    }

    fn record_success(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.saturating_record(micros.max(1));
        self.ops += 1;
    }

    fn record_error(&mut self, error: &ClientError) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(error.to_string());
        }
    }

    fn merge(&mut self, other: LoadOutcome) {
        self.latency_us
            .add(&other.latency_us)
            .expect("all outcome histograms share the bounds set in LoadOutcome::empty");
        self.ops += other.ops;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// Successful measured operations per second.
    pub fn throughput(&self) -> f64 {
        let seconds = self.measured.as_secs_f64();
        if seconds > 0.0 {
            self.ops as f64 / seconds
        } else {
            0.0
        }
    }
}

/// Runs `plan` over `connections` through `window` and returns what was measured. Returns once
/// every task has finished its last operation (at most one client deadline after `until`).
pub async fn run_closed_loop(
    connections: Vec<Client>,
    plan: LoadPlan,
    window: Window,
) -> Result<LoadOutcome, WorkloadError> {
    assert!(
        !connections.is_empty(),
        "callers validate that there is at least one connection"
    );
    let picker = OpPicker::new(plan.workload, plan.keys);
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..plan.clients {
        let client = connections[task % connections.len()].clone();
        let value = plan.value.clone();
        let rng = SmallRng::seed_from_u64(plan.seed.wrapping_add(task as u64));
        tasks.spawn(client_loop(client, picker, plan.keys, value, window, rng));
    }
    let mut total = LoadOutcome::empty(window.measured());
    while let Some(outcome) = tasks.join_next().await {
        total.merge(outcome?);
    }
    Ok(total)
}

async fn client_loop(
    client: Client,
    picker: OpPicker,
    keys: KeySpace,
    value: Bytes,
    window: Window,
    mut rng: SmallRng,
) -> LoadOutcome {
    let mut outcome = LoadOutcome::empty(window.measured());
    loop {
        let started = Instant::now();
        if started >= window.until {
            return outcome;
        }
        let result = match picker.next(&mut rng) {
            Op::Get(index) => client.get(keys.key(index)).await.map(|_| ()),
            Op::Put(index) => client.put(keys.key(index), value.clone()).await,
        };
        let finished = Instant::now();
        if !window.counts(started, finished) {
            continue;
        }
        match result {
            Ok(()) => outcome.record_success(finished - started),
            Err(error) => outcome.record_error(&error),
        }
    }
}

/// Writes `value` under every key of `keys`, `concurrency` writes at a time, spread over
/// `connections`. Fails on the first write the client could not complete.
pub async fn preload(
    connections: &[Client],
    keys: KeySpace,
    value: Bytes,
    concurrency: usize,
) -> Result<(), WorkloadError> {
    assert!(
        !connections.is_empty(),
        "callers validate that there is at least one connection"
    );
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..concurrency.max(1) {
        let client = connections[task % connections.len()].clone();
        let next = Arc::clone(&next);
        let value = value.clone();
        tasks.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= keys.count() {
                    return Ok(());
                }
                let key = keys.key(index);
                if let Err(source) = client.put(key.clone(), value.clone()).await {
                    return Err(WorkloadError::Preload {
                        key: String::from_utf8_lossy(&key).into_owned(),
                        source,
                    });
                }
            }
        });
    }
    // Dropping the set on an early return aborts the remaining writers.
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fixed_width_and_ordered_like_their_indices() {
        let keys = KeySpace::new(KeySpace::MAX_KEYS).unwrap();
        assert_eq!(&keys.key(42)[..], b"bench/0000000042");
        assert_eq!(&keys.key(9_999_999_999)[..], b"bench/9999999999");
        let mut previous = keys.key(0);
        for index in [1, 9, 10, 99, 100, 12_345, 1_000_000_000, 9_999_999_999] {
            let key = keys.key(index);
            assert_eq!(key.len(), previous.len());
            assert!(previous < key, "{previous:?} !< {key:?}");
            previous = key;
        }
    }

    #[test]
    fn key_count_is_validated() {
        assert!(KeySpace::new(0).is_err());
        assert!(KeySpace::new(KeySpace::MAX_KEYS + 1).is_err());
        assert_eq!(KeySpace::new(10).unwrap().count(), 10);
    }

    #[test]
    fn read_ratio_is_validated() {
        assert!(Workload::mixed(-0.1).is_err());
        assert!(Workload::mixed(1.01).is_err());
        assert!(Workload::mixed(f64::NAN).is_err());
        assert_eq!(Workload::mixed(0.25).unwrap().read_ratio(), 0.25);
        assert!(!Workload::Put.needs_preload());
        assert!(Workload::Get.needs_preload());
        assert!(!Workload::mixed(0.0).unwrap().needs_preload());
    }

    fn read_fraction(workload: Workload, samples: usize) -> f64 {
        let picker = OpPicker::new(workload, KeySpace::new(1000).unwrap());
        let mut rng = SmallRng::seed_from_u64(7);
        let reads = (0..samples)
            .filter(|_| matches!(picker.next(&mut rng), Op::Get(_)))
            .count();
        reads as f64 / samples as f64
    }

    #[test]
    fn operations_follow_the_read_ratio() {
        assert_eq!(read_fraction(Workload::Put, 10_000), 0.0);
        assert_eq!(read_fraction(Workload::Get, 10_000), 1.0);
        for ratio in [0.1, 0.5, 0.95] {
            let observed = read_fraction(Workload::mixed(ratio).unwrap(), 100_000);
            // The binomial standard deviation is below 0.0016 here; 0.01 is over six of them.
            assert!((observed - ratio).abs() < 0.01, "ratio {ratio}: {observed}");
        }
    }

    #[test]
    fn keys_are_chosen_uniformly_within_the_key_space() {
        let picker = OpPicker::new(Workload::Put, KeySpace::new(10).unwrap());
        let mut rng = SmallRng::seed_from_u64(1);
        let mut hits = [0u32; 10];
        for _ in 0..100_000 {
            let (Op::Get(index) | Op::Put(index)) = picker.next(&mut rng);
            hits[usize::try_from(index).unwrap()] += 1;
        }
        // Expected 10,000 each, standard deviation about 95.
        assert!(hits.iter().all(|h| (9_500..=10_500).contains(h)), "{hits:?}");
    }

    #[test]
    fn same_seed_same_operations() {
        let picker = OpPicker::new(Workload::mixed(0.5).unwrap(), KeySpace::new(1 << 20).unwrap());
        let run = |seed| {
            let mut rng = SmallRng::seed_from_u64(seed);
            (0..100).map(|_| picker.next(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn values_have_the_requested_size_and_depend_on_the_seed() {
        assert_eq!(value_of_size(128, 1).len(), 128);
        assert_eq!(value_of_size(0, 1).len(), 0);
        assert_eq!(value_of_size(64, 1), value_of_size(64, 1));
        assert_ne!(value_of_size(64, 1), value_of_size(64, 2));
    }

    #[test]
    fn only_operations_inside_the_window_count() {
        let start = Instant::now();
        let window = Window {
            measure_from: start + Duration::from_secs(2),
            until: start + Duration::from_secs(12),
        };
        let at = |ms| start + Duration::from_millis(ms);
        assert_eq!(window.measured(), Duration::from_secs(10));
        assert!(window.counts(at(2_000), at(2_010)));
        assert!(window.counts(at(11_990), at(12_000)));
        assert!(!window.counts(at(1_990), at(2_010)), "began during warm-up");
        assert!(!window.counts(at(11_990), at(12_010)), "still in flight at the end");
    }

    #[test]
    fn outcomes_merge_and_report_throughput() {
        let mut a = LoadOutcome::empty(Duration::from_secs(2));
        a.record_success(Duration::from_micros(100));
        a.record_success(Duration::from_millis(3));
        let mut b = LoadOutcome::empty(Duration::from_secs(2));
        b.record_success(Duration::ZERO);
        b.record_error(&ClientError::Config("first".into()));
        b.record_error(&ClientError::Config("second".into()));
        a.merge(b);
        assert_eq!(a.ops, 3);
        assert_eq!(a.errors, 2);
        assert!(a.first_error.as_deref().unwrap().contains("first"));
        assert_eq!(a.latency_us.len(), 3);
        assert_eq!(a.latency_us.min(), 1, "zero latency is recorded as 1us");
        assert_eq!(a.throughput(), 1.5);
    }
}
