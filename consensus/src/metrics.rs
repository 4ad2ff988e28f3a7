//! Prometheus metrics of the replication layer that cannot be sampled from a group's status:
//! event counts (snapshots built, sent, received, installed) and rejected peer traffic.
//!
//! Gauges such as term, commit and applied index are sampled by the server from
//! [`crate::Replication::status`] at scrape time instead, so they are never stale or duplicated.

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

/// The kinds of snapshot event counted in `basalt_raft_snapshots_total{event}`.
pub const SNAPSHOT_EVENTS: [&str; 6] = [
    "built",
    "sent",
    "send_failed",
    "received",
    "receive_rejected",
    "installed",
];

#[derive(Clone)]
pub struct ConsensusMetrics {
    /// Snapshot events by kind: built, sent, received, installed, send_failed, receive_rejected.
    pub snapshots: IntCounterVec,
    /// Peer messages whose checksum or encoding was bad; the sender retries them.
    pub corrupt_messages: IntCounter,
}

impl ConsensusMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self::unregistered()?;
        registry.register(Box::new(m.snapshots.clone()))?;
        registry.register(Box::new(m.corrupt_messages.clone()))?;
        Ok(m)
    }

    /// Metrics that count but are not exported (tests, tools).
    pub fn unregistered() -> prometheus::Result<Self> {
        let m = Self {
            snapshots: IntCounterVec::new(
                Opts::new("basalt_raft_snapshots_total", "Snapshot events by kind"),
                &["event"],
            )?,
            corrupt_messages: IntCounter::new(
                "basalt_raft_corrupt_messages_total",
                "Peer messages rejected for a bad checksum or encoding",
            )?,
        };
        // Every event is exported from the start, at 0, so a dashboard can tell "none yet" from
        // "not reported" and rate() has a baseline.
        for event in SNAPSHOT_EVENTS {
            m.snapshots.with_label_values(&[event]);
        }
        Ok(m)
    }

    pub fn snapshot_event(&self, event: &str) {
        self.snapshots.with_label_values(&[event]).inc();
    }
}
