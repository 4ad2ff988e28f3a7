//! Prometheus metrics of the storage layer.
//!
//! The numbers that explain write throughput live here: how many fsyncs the node does, how
//! many log entries and caller batches each fsync carries (the payoff of group commit), and how
//! long an fsync takes. Corruptions are counted so that an alert fires even if the error is
//! swallowed somewhere above. Handles are cheap clones of shared atomics, so every component
//! can hold its own copy; [`StorageMetrics::unregistered`] gives working but unexported
//! metrics for tests and for components created before a registry exists.

use prometheus::{Histogram, HistogramOpts, IntCounter, Registry};

use crate::error::{Result, StorageError};

/// Storage metrics; clones share the same underlying series.
#[derive(Clone, Debug)]
pub struct StorageMetrics {
    /// `basalt_storage_fsyncs_total`: WAL fsyncs issued by the group-commit writer.
    pub fsyncs: IntCounter,
    /// `basalt_storage_entries_per_fsync`: log entries made durable by each fsync.
    pub entries_per_fsync: Histogram,
    /// `basalt_storage_write_batches_total`: caller batches handed to the group-commit writer.
    pub write_batches: IntCounter,
    /// `basalt_storage_batches_per_fsync`: caller batches merged into each engine write.
    pub batches_per_fsync: Histogram,
    /// `basalt_storage_fsync_seconds`: latency of one group-commit fsync.
    pub fsync_seconds: Histogram,
    /// `basalt_storage_corruptions_total`: checksum or decoding failures of persisted data.
    pub corruptions: IntCounter,
}

impl StorageMetrics {
    /// Creates the metrics and registers them with `registry`.
    pub fn new(registry: &prometheus::Registry) -> Result<Self> {
        let metrics = Self::build()?;
        metrics.register(registry)?;
        Ok(metrics)
    }

    /// Creates metrics that are not exported anywhere.
    pub fn unregistered() -> Self {
        Self::build().expect("metric names, help texts and buckets are valid constants")
    }

    fn build() -> Result<Self> {
        let err = |source| StorageError::Metrics { source };
        // Powers of two: group sizes span from 1 (idle node) to thousands (saturated node).
        let count_buckets = prometheus::exponential_buckets(1.0, 2.0, 14).map_err(err)?;
        // 50µs (NVMe with power-loss protection) to ~1.6s (a struggling network disk).
        let fsync_buckets = prometheus::exponential_buckets(0.000_05, 2.0, 16).map_err(err)?;
        Ok(StorageMetrics {
            fsyncs: IntCounter::new(
                "basalt_storage_fsyncs_total",
                "WAL fsyncs issued by the group-commit writer",
            )
            .map_err(err)?,
            entries_per_fsync: Histogram::with_opts(
                HistogramOpts::new(
                    "basalt_storage_entries_per_fsync",
                    "Raft log entries made durable per fsync",
                )
                .buckets(count_buckets.clone()),
            )
            .map_err(err)?,
            write_batches: IntCounter::new(
                "basalt_storage_write_batches_total",
                "Write batches submitted to the group-commit writer",
            )
            .map_err(err)?,
            batches_per_fsync: Histogram::with_opts(
                HistogramOpts::new(
                    "basalt_storage_batches_per_fsync",
                    "Write batches merged into each fsynced engine write",
                )
                .buckets(count_buckets),
            )
            .map_err(err)?,
            fsync_seconds: Histogram::with_opts(
                HistogramOpts::new("basalt_storage_fsync_seconds", "Latency of one group-commit fsync")
                    .buckets(fsync_buckets),
            )
            .map_err(err)?,
            corruptions: IntCounter::new(
                "basalt_storage_corruptions_total",
                "Persisted records that failed verification",
            )
            .map_err(err)?,
        })
    }

    fn register(&self, registry: &Registry) -> Result<()> {
        let err = |source| StorageError::Metrics { source };
        registry.register(Box::new(self.fsyncs.clone())).map_err(err)?;
        registry
            .register(Box::new(self.entries_per_fsync.clone()))
            .map_err(err)?;
        registry.register(Box::new(self.write_batches.clone())).map_err(err)?;
        registry
            .register(Box::new(self.batches_per_fsync.clone()))
            .map_err(err)?;
        registry.register(Box::new(self.fsync_seconds.clone())).map_err(err)?;
        registry.register(Box::new(self.corruptions.clone())).map_err(err)?;
        Ok(())
    }

    /// Counts `err` if it is a corruption, and hands it back so callers can write
    /// `.map_err(|e| metrics.observe_error(e))`.
    pub fn observe_error(&self, err: StorageError) -> StorageError {
        if err.is_corruption() {
            self.corruptions.inc();
        }
        err
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_every_series_once() {
        let registry = Registry::new();
        let metrics = StorageMetrics::new(&registry).unwrap();
        metrics.fsyncs.inc();
        metrics.entries_per_fsync.observe(3.0);
        let names: Vec<String> = registry.gather().iter().map(|f| f.name().to_string()).collect();
        for name in [
            "basalt_storage_fsyncs_total",
            "basalt_storage_entries_per_fsync",
            "basalt_storage_write_batches_total",
            "basalt_storage_batches_per_fsync",
            "basalt_storage_fsync_seconds",
            "basalt_storage_corruptions_total",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} missing from {names:?}");
        }
        // A second registration of the same names is refused rather than silently duplicated.
        assert!(matches!(
            StorageMetrics::new(&registry),
            Err(StorageError::Metrics { .. })
        ));
    }

    #[test]
    fn counts_only_corruption_errors() {
        let metrics = StorageMetrics::unregistered();
        let _ = metrics.observe_error(StorageError::InvalidArgument("x".into()));
        assert_eq!(metrics.corruptions.get(), 0);
        let _ = metrics.observe_error(StorageError::corruption("bad crc"));
        assert_eq!(metrics.corruptions.get(), 1);
    }
}
