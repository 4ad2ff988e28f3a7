//! Prometheus metrics of the replication layer that cannot be sampled from a group's status:
//! event counts (snapshots built, sent, received, installed), rejected peer traffic, and the
//! peer transport's traffic by kind of message.
//!
//! Gauges such as term, commit and applied index are sampled by the server from
//! [`crate::Replication::status`] at scrape time instead, so they are never stale or duplicated.
//!
//! Peer traffic is counted per node (all groups together) by [`PeerKind`]: RPCs this node sent,
//! RPCs it served, and the bytes of the gRPC messages (the encoded `RaftMessage` or snapshot
//! chunk, not HTTP/2 framing) in each direction. A node's `bytes_sent` counts the requests it
//! sent *and* the replies it served, so the sum over nodes of `bytes_sent` equals the sum of
//! `bytes_received` on a healthy network: this is what makes the idle-group benchmark's "bytes/s
//! per node" a real figure rather than half of one.

use prometheus::{CounterVec, IntCounter, IntCounterVec, Opts, Registry};

/// The kinds of snapshot event counted in `basalt_raft_snapshots_total{event}`.
pub const SNAPSHOT_EVENTS: [&str; 6] = [
    "built",
    "sent",
    "send_failed",
    "received",
    "receive_rejected",
    "installed",
];

/// What a peer message is, for the traffic counters' `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// AppendEntries carrying log entries.
    Append,
    /// AppendEntries with no entries: a Raft heartbeat (or a commit-index update).
    Heartbeat,
    Vote,
    PreVote,
    TransferLeader,
    Snapshot,
    /// The node-to-node liveness exchange of idle-group hibernation (one per node pair and
    /// interval, whatever the number of groups).
    Liveness,
    /// A follower asking the leader for its read index (a `follower` read mode read).
    ReadIndex,
}

impl PeerKind {
    pub const ALL: [PeerKind; 8] = [
        PeerKind::Append,
        PeerKind::Heartbeat,
        PeerKind::Vote,
        PeerKind::PreVote,
        PeerKind::TransferLeader,
        PeerKind::Snapshot,
        PeerKind::Liveness,
        PeerKind::ReadIndex,
    ];

    pub fn label(self) -> &'static str {
        match self {
            PeerKind::Append => "append",
            PeerKind::Heartbeat => "heartbeat",
            PeerKind::Vote => "vote",
            PeerKind::PreVote => "pre_vote",
            PeerKind::TransferLeader => "transfer_leader",
            PeerKind::Snapshot => "snapshot",
            PeerKind::Liveness => "liveness",
            PeerKind::ReadIndex => "read_index",
        }
    }
}

#[derive(Clone)]
pub struct ConsensusMetrics {
    /// Snapshot events by kind: built, sent, received, installed, send_failed, receive_rejected.
    pub snapshots: IntCounterVec,
    /// Peer messages whose checksum or encoding was bad; the sender retries them.
    pub corrupt_messages: IntCounter,
    /// Peer RPCs this node sent, by kind.
    pub peer_rpcs_sent: IntCounterVec,
    /// Peer RPCs this node served, by kind.
    pub peer_rpcs_received: IntCounterVec,
    /// Bytes of peer messages this node sent (its requests and its replies), by kind.
    pub peer_bytes_sent: IntCounterVec,
    /// Bytes of peer messages this node received (requests it served, replies it got), by kind.
    pub peer_bytes_received: IntCounterVec,
    /// Groups put to sleep (a leader quiesced, or a follower that accepted it).
    pub hibernations: IntCounter,
    /// Sleeping groups woken, by reason.
    pub wakes: IntCounterVec,
    /// ReadIndex rounds run (leadership confirmations), and the reads they served: the ratio is
    /// how well concurrent reads share a round (see `raft::read_index`).
    pub read_index_rounds: IntCounter,
    pub read_index_reads: IntCounter,
    /// Replication codec work (`raft::frames`): bytes by operation, backend and form (`plain`
    /// for the uncompressed side, `framed` for what travels), and seconds spent.
    pub codec_bytes: IntCounterVec,
    pub codec_seconds: CounterVec,
    /// The per-kind children of the four traffic counters, resolved once: the transport updates
    /// them on every message, and a label lookup takes a lock and a hash.
    traffic: std::sync::Arc<[KindCounters; PeerKind::ALL.len()]>,
}

struct KindCounters {
    rpcs_sent: IntCounter,
    rpcs_received: IntCounter,
    bytes_sent: IntCounter,
    bytes_received: IntCounter,
}

/// Why a sleeping group woke, for `basalt_raft_group_wakes_total{reason}`.
pub const WAKE_REASONS: [&str; 7] = [
    // A client request or proposal reached the leader.
    "activity",
    // A peer message moved the replica's Raft state.
    "raft_message",
    // The leader's node stopped confirming the group (dead, cut off, or no longer listing it).
    "unconfirmed",
    // A member's node came back or restarted.
    "peer_returned",
    // A follower would not sleep at the leader's point.
    "refused",
    // The periodic check found the Raft state moved.
    "state_changed",
    // A reopened replica heard from nobody in time.
    "dormant_expired",
];

impl ConsensusMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self::unregistered()?;
        registry.register(Box::new(m.snapshots.clone()))?;
        registry.register(Box::new(m.corrupt_messages.clone()))?;
        registry.register(Box::new(m.peer_rpcs_sent.clone()))?;
        registry.register(Box::new(m.peer_rpcs_received.clone()))?;
        registry.register(Box::new(m.peer_bytes_sent.clone()))?;
        registry.register(Box::new(m.peer_bytes_received.clone()))?;
        registry.register(Box::new(m.hibernations.clone()))?;
        registry.register(Box::new(m.wakes.clone()))?;
        registry.register(Box::new(m.read_index_rounds.clone()))?;
        registry.register(Box::new(m.read_index_reads.clone()))?;
        registry.register(Box::new(m.codec_bytes.clone()))?;
        registry.register(Box::new(m.codec_seconds.clone()))?;
        Ok(m)
    }

    /// Metrics that count but are not exported (tests, tools).
    pub fn unregistered() -> prometheus::Result<Self> {
        let by_kind = |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["kind"]);
        let peer_rpcs_sent = by_kind("basalt_peer_rpcs_sent_total", "Peer RPCs this node sent, by kind")?;
        let peer_rpcs_received = by_kind("basalt_peer_rpcs_received_total", "Peer RPCs this node served, by kind")?;
        let peer_bytes_sent = by_kind(
            "basalt_peer_bytes_sent_total",
            "Bytes of peer messages this node sent (requests and replies), by kind",
        )?;
        let peer_bytes_received = by_kind(
            "basalt_peer_bytes_received_total",
            "Bytes of peer messages this node received (requests and replies), by kind",
        )?;
        // Resolving every label here also exports each kind from the start, at 0.
        let traffic = std::sync::Arc::new(PeerKind::ALL.map(|kind| {
            let k = [kind.label()];
            KindCounters {
                rpcs_sent: peer_rpcs_sent.with_label_values(&k),
                rpcs_received: peer_rpcs_received.with_label_values(&k),
                bytes_sent: peer_bytes_sent.with_label_values(&k),
                bytes_received: peer_bytes_received.with_label_values(&k),
            }
        }));
        let m = Self {
            snapshots: IntCounterVec::new(
                Opts::new("basalt_raft_snapshots_total", "Snapshot events by kind"),
                &["event"],
            )?,
            corrupt_messages: IntCounter::new(
                "basalt_raft_corrupt_messages_total",
                "Peer messages rejected for a bad checksum or encoding",
            )?,
            peer_rpcs_sent,
            peer_rpcs_received,
            peer_bytes_sent,
            peer_bytes_received,
            hibernations: IntCounter::new(
                "basalt_raft_group_hibernations_total",
                "Times a replica went to sleep: a leader quiesced its idle group, or a follower accepted that",
            )?,
            wakes: IntCounterVec::new(
                Opts::new("basalt_raft_group_wakes_total", "Sleeping replicas woken, by reason"),
                &["reason"],
            )?,
            read_index_rounds: IntCounter::new(
                "basalt_read_index_rounds_total",
                "ReadIndex rounds this node ran as a leader (one quorum confirmation each)",
            )?,
            read_index_reads: IntCounter::new(
                "basalt_read_index_reads_total",
                "Reads (local and followers') that waited for a ReadIndex round on this node",
            )?,
            codec_bytes: IntCounterVec::new(
                Opts::new(
                    "basalt_replication_codec_bytes_total",
                    "Bytes through the replication codec, by operation (encode, decode), backend (cpu, gpu) and form (plain: uncompressed; framed: as sent)",
                ),
                &["op", "backend", "form"],
            )?,
            codec_seconds: CounterVec::new(
                Opts::new(
                    "basalt_replication_codec_seconds_total",
                    "Time spent encoding and decoding replication frames, by operation and backend",
                ),
                &["op", "backend"],
            )?,
            traffic,
        };
        // Every label is exported from the start, at 0, so a dashboard can tell "none yet" from
        // "not reported" and rate() has a baseline.
        for event in SNAPSHOT_EVENTS {
            m.snapshots.with_label_values(&[event]);
        }
        for reason in WAKE_REASONS {
            m.wakes.with_label_values(&[reason]);
        }
        Ok(m)
    }

    pub fn snapshot_event(&self, event: &str) {
        self.snapshots.with_label_values(&[event]).inc();
    }

    /// One outgoing RPC of `kind`: `request` bytes sent, `reply` bytes received (0 if it failed).
    pub fn rpc_sent(&self, kind: PeerKind, request: usize, reply: usize) {
        let c = &self.traffic[kind as usize];
        c.rpcs_sent.inc();
        c.bytes_sent.inc_by(request as u64);
        c.bytes_received.inc_by(reply as u64);
    }

    /// One incoming RPC of `kind` served: `request` bytes received, `reply` bytes sent.
    pub fn rpc_served(&self, kind: PeerKind, request: usize, reply: usize) {
        let c = &self.traffic[kind as usize];
        c.rpcs_received.inc();
        c.bytes_received.inc_by(request as u64);
        c.bytes_sent.inc_by(reply as u64);
    }

    /// One codec operation: `plain` uncompressed bytes, `framed` bytes as sent, and its time.
    pub fn codec_work(
        &self,
        op: &str,
        backend: basalt_gpu::BackendKind,
        plain: usize,
        framed: usize,
        took: std::time::Duration,
    ) {
        let b = backend.name();
        self.codec_bytes
            .with_label_values(&[op, b, "plain"])
            .inc_by(plain as u64);
        self.codec_bytes
            .with_label_values(&[op, b, "framed"])
            .inc_by(framed as u64);
        self.codec_seconds
            .with_label_values(&[op, b])
            .inc_by(took.as_secs_f64());
    }

    pub fn woke(&self, reason: &'static str) {
        self.wakes.with_label_values(&[reason]).inc();
    }
}
