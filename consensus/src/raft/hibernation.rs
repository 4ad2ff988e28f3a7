//! Hibernation of idle groups: an idle group stops ticking on all of its replicas, and one
//! liveness exchange per node pair stands in for the heartbeats of every sleeping group.
//!
//! **Why.** openraft ticks every group every `heartbeat_interval * 13 / 64` (10 ms at the 50 ms
//! default) and each leader sends a heartbeat to each follower every `heartbeat_interval`. A node
//! holding 1,000 groups of 3 replicas therefore wakes 100,000 times a second and sends or
//! answers about 40,000 heartbeats a second while nothing at all is happening. CockroachDB
//! ("quiescence") and TiKV ("hibernate regions") stop idle groups from ticking; this is the same
//! idea on openraft's runtime switch `Raft::runtime_config().tick(bool)`.
//!
//! **The protocol.** A group moves through these states (see [`Sleep`]); the node's
//! [`Hibernation`] task evaluates every local group once per `liveness_interval` and exchanges one
//! liveness message with every peer node per interval.
//!
//! 1. *Quiescing* (leader). A leader whose group saw no client activity (proposal, read barrier,
//!    membership change, leader transfer) for `idle_after`, whose configuration is uniform, whose
//!    last log entry is committed and matched by every member whose node is alive, lists the group
//!    in its liveness messages with its [`Point`] (term and last log id). It keeps ticking.
//! 2. *Asleep* (follower). A follower that sees its group listed by the node it knows as the
//!    group's leader, at exactly its own term, last log id and commit, stops ticking and answers
//!    that it accepted; otherwise it refuses, and the leader goes back to heartbeating.
//! 3. *Quiesced* (leader). Once every live member accepted, the leader stops ticking too: no
//!    timers, no heartbeats. Followers stop before the leader does, so no follower's election
//!    timer runs while its leader is silent.
//!
//! **Waking.** Any client activity on the leader wakes it (ticking resumes; a write's own
//! AppendEntries then moves the followers' state, which wakes them). A woken leader's quorum-ack
//! lease has run out (it sent no heartbeats), and openraft refuses writes on an expired lease, so
//! the first write or membership change after a wake confirms leadership with one ReadIndex round
//! first (`RaftGroup::renew_lease_after_sleep`). A request that reaches a
//! follower is forwarded to the leader and wakes it there; the follower itself is not woken by
//! it, since its lease expired long ago and a ticking follower would campaign at once. A replica whose Raft state
//! moves (term, leader, last log id, commit) wakes, whether a message or the periodic check saw
//! it. A follower wakes when its leader's node has not confirmed the group for `liveness_timeout`
//! (the node died, was cut off, restarted, or stopped listing the group): it then elects a new
//! leader at once, its lease having long expired, after a per-group jitter so that the groups of
//! a dead node do not all campaign in the same instant. A leader wakes a group when a member's
//! node comes back (after being silent, or with a new incarnation), so the returning replica
//! catches up and learns the leader.
//!
//! **Restarts.** A replica that is reopened with state (a term above 0) starts *dormant*: not
//! ticking, since its group may well be asleep and an election would only disturb it. Any Raft
//! message for it, or confirmation by its leader, settles it; if neither comes within
//! `liveness_timeout` (plus jitter) it wakes and campaigns as usual.
//!
//! **Safety.** Only openraft's tick is switched, which drives elections and heartbeats and
//! nothing else: log replication, commitment, voting and ReadIndex (which sends its own heartbeat
//! round) are untouched, so what Raft guarantees (one leader per term, no lost committed entry,
//! linearizable reads) does not depend on this module. What it changes is *when* elections
//! happen. One more rule keeps that stable: a sleeping follower whose leader's node confirmed the
//! group within `liveness_timeout` refuses votes (except for a leadership transfer) without
//! consulting openraft, the same answer openraft's leader lease gives while heartbeats arrive.
//! Refusing a vote is always safe; it keeps a node that is cut off from the leader only from
//! taking over a group the rest of the quorum still serves.
//!
//! **Invariants.** A replica's sleep state is only changed under its own lock, and the node's
//! peer table lock, when both are held, is taken first. Maps are `BTreeMap`s and groups are
//! visited in id order, so the simulator's runs stay deterministic.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use basalt_proto::v1::RaftMessage;
use openraft::async_runtime::WatchReceiver;
use openraft::raft::{VoteRequest, VoteResponse};
use openraft::ServerState;
use parking_lot::Mutex;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use super::network::{PeerClients, RemoteResult};
use super::peer_service::GroupRegistry;
use super::types::{LogId, TypeConfig};
use super::wire;
use super::RaftGroup;
use crate::{ConsensusMetrics, PeerKind, Replication};

/// Settings of hibernation, the same on every group of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HibernationConfig {
    /// How often the node evaluates its groups and exchanges liveness with each peer.
    pub liveness_interval: Duration,
    /// A peer node not heard from for this long is taken for dead: its sleeping groups' followers
    /// wake and elect, and leaders stop waiting for it. Several intervals, so one lost exchange
    /// wakes nothing.
    pub liveness_timeout: Duration,
    /// A leader without client activity for this long starts quiescing its group.
    pub idle_after: Duration,
    /// Wakes caused by a silent leader are spread over this much time per group, so that the
    /// groups of a dead node do not all campaign at once (and two followers of one group rarely
    /// split the vote).
    pub wake_jitter: Duration,
}

impl HibernationConfig {
    /// The jittered delay after `liveness_timeout` at which replica `node` of `group` wakes when
    /// its leader is silent: fixed per replica (a hash), so two followers of one group differ.
    pub fn jitter(&self, group: u64, node: u64) -> Duration {
        let spread = self.wake_jitter.as_micros() as u64;
        if spread == 0 {
            return Duration::ZERO;
        }
        Duration::from_micros(mix(group ^ mix(node)) % spread)
    }
}

/// splitmix64's finaliser: a well-spread hash of a u64, stable across runs and platforms.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Where a group stands: every replica of a sleeping group is at the same point, with its
/// whole log committed (its last log entry is the committed one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    pub term: u64,
    pub committed: Option<LogId>,
}

/// A replica's hibernation state. Only `Awake` and `Quiescing` tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sleep {
    Awake,
    /// Leader: idle and fully replicated at `at`, asking the followers to sleep.
    Quiescing {
        at: Point,
    },
    /// Leader: every live follower accepted; not ticking.
    Quiesced {
        at: Point,
    },
    /// Follower: `leader`'s node confirmed the group at `at`, last at `confirmed`; not ticking.
    Asleep {
        leader: u64,
        at: Point,
        confirmed: Instant,
    },
    /// Reopened with state and not yet settled; not ticking until `until`.
    Dormant {
        until: Instant,
    },
}

impl Sleep {
    fn ticks(&self) -> bool {
        matches!(self, Sleep::Awake | Sleep::Quiescing { .. })
    }
}

/// A replica's sleep state and its last client activity, behind the replica's own lock.
#[derive(Debug)]
pub(crate) struct SleepCell {
    pub(crate) state: Sleep,
    pub(crate) last_activity: Instant,
}

impl SleepCell {
    pub(crate) fn new(state: Sleep) -> Self {
        Self {
            state,
            last_activity: Instant::now(),
        }
    }
}

/// What the hibernation logic reads of a replica, in one look at its Raft metrics.
#[derive(Debug, Clone)]
pub(crate) struct Observed {
    pub(crate) state: ServerState,
    pub(crate) running: bool,
    pub(crate) leader: Option<u64>,
    /// Term and commit; the point of the group only when `settled`.
    pub(crate) point: Point,
    /// The last log entry is the committed one.
    pub(crate) settled: bool,
    pub(crate) vote: super::types::Vote,
    /// Only one configuration (no membership change half done).
    pub(crate) uniform: bool,
    /// Every member (voters and learners) with its address.
    pub(crate) members: BTreeMap<u64, String>,
    pub(crate) voters: usize,
    /// Leader only: the last log id each member is known to hold.
    pub(crate) matched: BTreeMap<u64, Option<LogId>>,
}

impl RaftGroup {
    pub(crate) fn observe(&self) -> Observed {
        let m = self.raft().metrics();
        let m = m.borrow_watched();
        let mem = m.membership_config.membership();
        Observed {
            state: m.state,
            running: m.running_state.is_ok() && self.health().stopped().is_none(),
            leader: m.current_leader,
            point: Point {
                term: m.current_term,
                committed: m.local_committed,
            },
            settled: m.last_log_index == m.local_committed.map(|l| l.index),
            vote: m.vote,
            uniform: mem.get_joint_config().len() == 1,
            members: mem.nodes().map(|(id, n)| (*id, n.addr.clone())).collect(),
            voters: mem.voter_ids().count(),
            matched: m
                .replication
                .as_ref()
                .map(|r| r.iter().map(|(id, l)| (*id, *l)).collect())
                .unwrap_or_default(),
        }
    }

    /// Client activity: remembered (it keeps a leader from quiescing), and it wakes a quiescing
    /// or quiesced leader. A sleeping follower stays asleep: the request goes on to the leader
    /// (forwarded), whose writes then move the follower's log and wake it. Waking the follower
    /// here would restart its election timer on a lease that expired long ago, and it would
    /// campaign against a healthy leader.
    ///
    /// Returns whether it woke a quiesced leader: one that sent no heartbeats while it slept.
    pub(crate) fn touch(&self) -> bool {
        if self.hibernation().is_none() {
            return false;
        }
        let mut cell = self.sleep().lock();
        cell.last_activity = Instant::now();
        let quiesced = matches!(cell.state, Sleep::Quiesced { .. });
        if matches!(cell.state, Sleep::Quiescing { .. } | Sleep::Quiesced { .. }) {
            self.set_state(&mut cell, Sleep::Awake, "activity");
        }
        quiesced
    }

    /// Moves to `next`, switching openraft's tick when ticking changes. A replica that stops
    /// ticking counts as a hibernation, one that starts again as a wake for `reason`.
    pub(crate) fn set_state(&self, cell: &mut SleepCell, next: Sleep, reason: &'static str) {
        let (was, will) = (cell.state.ticks(), next.ticks());
        cell.state = next;
        if was == will {
            return;
        }
        self.raft().runtime_config().tick(will);
        if will {
            self.metrics().woke(reason);
            tracing::debug!(group = self.group_id(), reason, "replica woke");
        } else {
            self.metrics().hibernations.inc();
            tracing::debug!(group = self.group_id(), "replica went to sleep");
        }
    }

    /// After a peer message for this replica was handled: a dormant replica has been found by its
    /// group and wakes; a sleeping one wakes if its Raft state moved.
    pub(crate) fn after_message(&self) {
        if self.hibernation().is_none() {
            return;
        }
        let now = self.observe();
        let mut cell = self.sleep().lock();
        let moved = match &cell.state {
            Sleep::Awake => false,
            Sleep::Dormant { .. } => true,
            Sleep::Asleep { leader, at, .. } => !follower_matches(&now, *leader, at),
            Sleep::Quiescing { at } | Sleep::Quiesced { at } => !leader_matches(&now, self.node_id(), at),
        };
        if moved {
            self.set_state(&mut cell, Sleep::Awake, "raft_message");
        }
    }

    /// The refusal a sleeping follower gives a vote request while its leader's node confirms the
    /// group (see the module documentation), or `None` to let openraft decide.
    pub(crate) fn refuse_vote(
        &self,
        req: &VoteRequest<TypeConfig>,
        timeout: Duration,
    ) -> Option<VoteResponse<TypeConfig>> {
        if req.leadership_transfer {
            return None;
        }
        let fresh = match &self.sleep().lock().state {
            Sleep::Asleep { confirmed, .. } => confirmed.elapsed() <= timeout,
            _ => false,
        };
        if !fresh {
            return None;
        }
        // Asleep means settled, so the last log id is the committed one; if the state moved
        // meanwhile, openraft decides.
        let now = self.observe();
        now.settled
            .then(|| VoteResponse::new(now.vote, now.point.committed, false))
    }
}

/// Whether a leader's replica is still at `at`, leading.
fn leader_matches(o: &Observed, me: u64, at: &Point) -> bool {
    o.running && o.settled && o.state == ServerState::Leader && o.leader == Some(me) && o.point == *at
}

/// Whether a follower (or learner) is at `at` under `leader`, with its whole log committed.
fn follower_matches(o: &Observed, leader: u64, at: &Point) -> bool {
    o.running
        && o.settled
        && matches!(o.state, ServerState::Follower | ServerState::Learner)
        && o.leader == Some(leader)
        && o.point == *at
}

/// The liveness request: who sends it, which run of that node, and the groups it leads that it
/// asks the receiver to sleep in (those of which the receiver is a member).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct LivenessRequest {
    pub(crate) from: u64,
    pub(crate) incarnation: u64,
    pub(crate) quiesced: Vec<(u64, Point)>,
}

/// The answer: the same about the receiver, and the listed groups it would not sleep in.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct LivenessReply {
    pub(crate) from: u64,
    pub(crate) incarnation: u64,
    pub(crate) refused: Vec<u64>,
}

/// What this node knows of one peer node.
#[derive(Debug)]
struct PeerView {
    /// Since when it has been tracked; a peer never heard from counts from here.
    since: Instant,
    last_heard: Option<Instant>,
    incarnation: Option<u64>,
    /// The groups this node leads that the peer accepted to sleep in, at its last reply.
    accepted: BTreeMap<u64, Point>,
}

impl PeerView {
    fn new(now: Instant) -> Self {
        Self {
            since: now,
            last_heard: None,
            incarnation: None,
            accepted: BTreeMap::new(),
        }
    }

    fn alive(&self, now: Instant, timeout: Duration) -> bool {
        now.saturating_duration_since(self.last_heard.unwrap_or(self.since)) <= timeout
    }
}

/// The node-level half of hibernation: the periodic evaluation of every local group and the
/// liveness exchange with every peer node.
pub struct Hibernation {
    node_id: u64,
    /// Distinguishes this run of the node from earlier ones, so peers notice a restart even when
    /// it was quicker than `liveness_timeout`.
    incarnation: u64,
    cfg: HibernationConfig,
    registry: GroupRegistry,
    peers: PeerClients,
    metrics: ConsensusMetrics,
    table: Mutex<BTreeMap<u64, PeerView>>,
}

/// The local replicas by hibernation state, for metrics and tests.
pub fn census(registry: &GroupRegistry) -> Census {
    let mut c = Census::default();
    for g in registry.all() {
        match g.sleep().lock().state {
            Sleep::Awake => c.awake += 1,
            Sleep::Quiescing { .. } => c.quiescing += 1,
            Sleep::Quiesced { .. } => c.quiesced += 1,
            Sleep::Asleep { .. } => c.asleep += 1,
            Sleep::Dormant { .. } => c.dormant += 1,
        }
    }
    c
}

/// How many local replicas are in each hibernation state (see [`census`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Census {
    pub awake: usize,
    /// Leaders asking their followers to sleep.
    pub quiescing: usize,
    /// Leaders that stopped ticking.
    pub quiesced: usize,
    /// Followers that stopped ticking.
    pub asleep: usize,
    pub dormant: usize,
}

impl Hibernation {
    pub fn new(
        node_id: u64,
        cfg: HibernationConfig,
        registry: GroupRegistry,
        peers: PeerClients,
        metrics: ConsensusMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            node_id,
            incarnation: rand::random(),
            cfg,
            registry,
            peers,
            metrics,
            table: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn config(&self) -> &HibernationConfig {
        &self.cfg
    }

    fn groups(&self) -> Vec<Arc<RaftGroup>> {
        let mut all = self.registry.all();
        all.sort_by_key(|g| g.group_id());
        all
    }

    /// Runs the periodic evaluation and liveness exchange until `shutdown` fires.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        // A fixed period: an exchange held up by a dead peer (it waits at most one interval)
        // must not stretch the time between confirmations the followers count on.
        let mut ticks = tokio::time::interval(self.cfg.liveness_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.changed() => return,
            }
            let now = Instant::now();
            let stalled = now.saturating_duration_since(last) > self.cfg.liveness_timeout;
            last = now;
            let groups = self.groups();
            if stalled {
                // This node itself was stopped (paused, starved of CPU): the silence it sees is
                // its own. Its leaders get a fresh timeout to be heard from, and nothing is
                // judged until one exchange has refreshed what it knows of its peers.
                tracing::info!("hibernation: the node stalled; giving sleeping groups' leaders a fresh timeout");
                for g in &groups {
                    if let Sleep::Asleep { confirmed, .. } = &mut g.sleep().lock().state {
                        *confirmed = now;
                    }
                }
            } else {
                for g in &groups {
                    self.evaluate(g);
                }
            }
            self.exchange(&groups).await;
        }
    }

    /// One group's periodic transition (see the module documentation).
    fn evaluate(&self, g: &RaftGroup) {
        let now = Instant::now();
        let o = g.observe();
        let me = self.node_id;
        let table = self.table.lock();
        let mut cell = g.sleep().lock();
        let next = match &cell.state {
            Sleep::Awake => {
                let idle = now.saturating_duration_since(cell.last_activity) >= self.cfg.idle_after;
                (idle && self.quiescable(&o, &table, now)).then(|| Sleep::Quiescing { at: o.point.clone() })
            }
            Sleep::Quiescing { at } => {
                if !leader_matches(&o, me, at) || !self.quiescable(&o, &table, now) {
                    Some(Sleep::Awake)
                } else {
                    let all_accepted = o.members.keys().filter(|&&n| n != me).all(|n| match table.get(n) {
                        Some(p) if p.alive(now, self.cfg.liveness_timeout) => p.accepted.get(&g.group_id()) == Some(at),
                        _ => true,
                    });
                    all_accepted.then(|| Sleep::Quiesced { at: at.clone() })
                }
            }
            Sleep::Quiesced { at } => (!leader_matches(&o, me, at)).then_some(Sleep::Awake),
            Sleep::Asleep { leader, at, confirmed } => {
                let deadline = *confirmed + self.cfg.liveness_timeout + self.cfg.jitter(g.group_id(), me);
                if !follower_matches(&o, *leader, at) || now > deadline {
                    Some(Sleep::Awake)
                } else {
                    None
                }
            }
            Sleep::Dormant { until } => (now > *until || o.voters <= 1).then_some(Sleep::Awake),
        };
        let Some(next) = next else { return };
        let reason = match &cell.state {
            Sleep::Asleep { leader, at, .. } if follower_matches(&o, *leader, at) => "unconfirmed",
            Sleep::Dormant { .. } => "dormant_expired",
            _ => "state_changed",
        };
        g.set_state(&mut cell, next, reason);
    }

    /// Whether a leader may start quiescing: uniform configuration, everything committed, and
    /// every member whose node is alive holding the last entry.
    fn quiescable(&self, o: &Observed, table: &BTreeMap<u64, PeerView>, now: Instant) -> bool {
        let me = self.node_id;
        if !(o.running && o.settled && o.state == ServerState::Leader && o.leader == Some(me) && o.uniform) {
            return false;
        }
        o.members.keys().filter(|&&n| n != me).all(|n| {
            let alive = table.get(n).is_some_and(|p| p.alive(now, self.cfg.liveness_timeout));
            !alive || o.matched.get(n).is_some_and(|m| *m == o.point.committed)
        })
    }

    /// Sends this interval's liveness message to every peer of every local group and handles
    /// the replies that come back within the interval.
    async fn exchange(&self, groups: &[Arc<RaftGroup>]) {
        let now = Instant::now();
        let me = self.node_id;
        let mut addrs: BTreeMap<u64, String> = BTreeMap::new();
        let mut lists: BTreeMap<u64, Vec<(u64, Point)>> = BTreeMap::new();
        for g in groups {
            let o = g.observe();
            let listed = match &g.sleep().lock().state {
                Sleep::Quiescing { at } | Sleep::Quiesced { at } => Some(at.clone()),
                _ => None,
            };
            for (id, addr) in o.members.iter().filter(|(id, _)| **id != me) {
                addrs.entry(*id).or_insert_with(|| addr.clone());
                if let Some(at) = &listed {
                    lists.entry(*id).or_default().push((g.group_id(), at.clone()));
                }
            }
        }
        {
            let mut table = self.table.lock();
            for id in addrs.keys() {
                table.entry(*id).or_insert_with(|| PeerView::new(now));
            }
            table.retain(|id, _| addrs.contains_key(id));
        }
        let sends = addrs.into_iter().map(|(peer, addr)| {
            let list = lists.remove(&peer).unwrap_or_default();
            async move {
                let sent: Vec<(u64, Point)> = list.clone();
                let req = LivenessRequest {
                    from: me,
                    incarnation: self.incarnation,
                    quiesced: list,
                };
                let r = tokio::time::timeout(self.cfg.liveness_interval, self.send(&addr, &req)).await;
                (peer, sent, r)
            }
        });
        for (peer, sent, r) in futures::future::join_all(sends).await {
            match r {
                Ok(Ok(reply)) => self.on_reply(peer, sent, reply),
                Ok(Err(e)) => tracing::trace!(peer, error = %e, "liveness exchange failed"),
                Err(_) => tracing::trace!(peer, "liveness exchange timed out"),
            }
        }
    }

    async fn send(&self, addr: &str, req: &LivenessRequest) -> Result<LivenessReply, String> {
        let payload = wire::encode("liveness", req).map_err(|e| e.to_string())?;
        let msg = RaftMessage {
            group_id: 0,
            crc32: wire::crc(&[&payload]),
            payload: payload.into(),
            framed: false,
        };
        let sent = msg.encoded_len();
        let mut client = self.peers.client(addr).map_err(|e| e.to_string())?;
        let reply = match client.node_liveness(msg).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                self.metrics.rpc_sent(PeerKind::Liveness, sent, 0);
                return Err(s.to_string());
            }
        };
        self.metrics.rpc_sent(PeerKind::Liveness, sent, reply.encoded_len());
        let decoded = wire::verify_crc("liveness reply", &[&reply.payload], reply.crc32)
            .and_then(|()| wire::decode::<RemoteResult<LivenessReply>>("liveness reply", &reply.payload));
        match decoded {
            Ok(r) => r,
            Err(e) => {
                self.metrics.corrupt_messages.inc();
                Err(e.to_string())
            }
        }
    }

    /// Records that `peer` (running as `incarnation`) was heard from now. A peer that comes back
    /// (never heard from before, silent past the timeout, or restarted) wakes the groups this
    /// node leads and asks it to sleep in, so it catches up and learns the leader; a restarted
    /// peer also wakes the groups asleep under it, since whatever it led before it leads nothing
    /// now.
    fn heard(&self, table: &mut BTreeMap<u64, PeerView>, peer: u64, incarnation: u64) {
        let now = Instant::now();
        let view = table.entry(peer).or_insert_with(|| PeerView::new(now));
        let was_alive = view.last_heard.is_some() && view.alive(now, self.cfg.liveness_timeout);
        let restarted = view.incarnation.is_some_and(|i| i != incarnation);
        view.last_heard = Some(now);
        view.incarnation = Some(incarnation);
        if restarted {
            view.accepted.clear();
        }
        if was_alive && !restarted {
            return;
        }
        for g in self.groups() {
            let mut cell = g.sleep().lock();
            let wake = match &cell.state {
                Sleep::Quiescing { .. } | Sleep::Quiesced { .. } => g.observe().members.contains_key(&peer),
                Sleep::Asleep { leader, .. } => restarted && *leader == peer,
                _ => false,
            };
            if wake {
                g.set_state(&mut cell, Sleep::Awake, "peer_returned");
            }
        }
    }

    fn on_reply(&self, peer: u64, sent: Vec<(u64, Point)>, reply: LivenessReply) {
        let mut table = self.table.lock();
        self.heard(&mut table, peer, reply.incarnation);
        let refused: BTreeSet<u64> = reply.refused.into_iter().collect();
        let accepted = sent.into_iter().filter(|(g, _)| !refused.contains(g)).collect();
        if let Some(view) = table.get_mut(&peer) {
            view.accepted = accepted;
        }
        drop(table);
        for id in refused {
            if let Some(g) = self.registry.get(id) {
                let mut cell = g.sleep().lock();
                match cell.state {
                    // Not asleep yet: back to heartbeating, and the next interval asks again.
                    Sleep::Quiescing { .. } | Sleep::Quiesced { .. } => g.set_state(&mut cell, Sleep::Awake, "refused"),
                    _ => {}
                }
            }
        }
    }

    /// Answers a peer's liveness request: sleeps the listed groups this replica agrees on, and
    /// names the rest.
    pub(crate) fn on_request(&self, req: LivenessRequest) -> LivenessReply {
        {
            let mut table = self.table.lock();
            self.heard(&mut table, req.from, req.incarnation);
        }
        let now = Instant::now();
        let mut refused = Vec::new();
        for (id, at) in req.quiesced {
            let Some(g) = self.registry.get(id) else {
                refused.push(id);
                continue;
            };
            let o = g.observe();
            let mut cell = g.sleep().lock();
            if follower_matches(&o, req.from, &at) {
                let next = Sleep::Asleep {
                    leader: req.from,
                    at,
                    confirmed: now,
                };
                g.set_state(&mut cell, next, "");
            } else {
                refused.push(id);
                if matches!(&cell.state, Sleep::Asleep { leader, .. } if *leader == req.from) {
                    g.set_state(&mut cell, Sleep::Awake, "refused");
                }
            }
        }
        LivenessReply {
            from: self.node_id,
            incarnation: self.incarnation,
            refused,
        }
    }

    /// The answer of a node that does not hibernate: it refuses every group, so no leader stops
    /// heartbeating a replica that would go on ticking.
    pub(crate) fn refuse_all(node_id: u64, req: LivenessRequest) -> LivenessReply {
        LivenessReply {
            from: node_id,
            incarnation: 0,
            refused: req.quiesced.into_iter().map(|(g, _)| g).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::vote::RaftLeaderId;

    use super::*;
    use crate::raft::types::Vote;

    fn log_id(term: u64, node: u64, index: u64) -> LogId {
        let leader = openraft::alias::LeaderIdOf::<TypeConfig>::new(term, node);
        LogId::new(leader.to_committed(), index)
    }

    /// Node 1 leading a settled 3-member group at term 2, index 10, every follower matched.
    fn leading() -> Observed {
        let last = Some(log_id(2, 1, 10));
        Observed {
            state: ServerState::Leader,
            running: true,
            leader: Some(1),
            point: Point {
                term: 2,
                committed: last,
            },
            settled: true,
            vote: Vote::new_committed(2, 1),
            uniform: true,
            members: (1..=3).map(|n| (n, format!("127.0.0.1:{n}"))).collect(),
            voters: 3,
            matched: (1..=3).map(|n| (n, last)).collect(),
        }
    }

    fn following(o: &Observed) -> Observed {
        Observed {
            state: ServerState::Follower,
            matched: BTreeMap::new(),
            ..o.clone()
        }
    }

    fn hibernation() -> Arc<Hibernation> {
        Hibernation::new(
            1,
            HibernationConfig {
                liveness_interval: Duration::from_millis(200),
                liveness_timeout: Duration::from_secs(1),
                idle_after: Duration::from_secs(2),
                wake_jitter: Duration::from_millis(300),
            },
            GroupRegistry::default(),
            PeerClients::new(),
            ConsensusMetrics::unregistered().unwrap(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_quiesces_only_when_every_live_member_holds_everything() {
        let h = hibernation();
        let now = Instant::now();
        let mut table: BTreeMap<u64, PeerView> = (2..=3).map(|n| (n, PeerView::new(now))).collect();
        for p in table.values_mut() {
            p.last_heard = Some(now);
        }
        let o = leading();
        assert!(h.quiescable(&o, &table, now));

        let mut behind = o.clone();
        behind.matched.insert(3, Some(log_id(2, 1, 9)));
        assert!(!h.quiescable(&behind, &table, now), "a live follower lags");
        let later = now + Duration::from_secs(2);
        table.get_mut(&2).unwrap().last_heard = Some(later);
        assert!(
            h.quiescable(&behind, &table, later),
            "the lagging follower's node is dead; it is woken when it returns"
        );

        let mut joint = o.clone();
        joint.uniform = false;
        assert!(!h.quiescable(&joint, &table, now), "a membership change is half done");
        let mut unsettled = o.clone();
        unsettled.settled = false;
        assert!(
            !h.quiescable(&unsettled, &table, now),
            "the last entry is not committed"
        );
        assert!(!h.quiescable(&following(&o), &table, now), "only a leader quiesces");
    }

    #[test]
    fn followers_sleep_only_at_the_leaders_exact_point() {
        let o = leading();
        let at = o.point.clone();
        assert!(leader_matches(&o, 1, &at));
        assert!(!leader_matches(&o, 2, &at));
        let f = following(&o);
        assert!(follower_matches(&f, 1, &at));
        assert!(!follower_matches(&f, 2, &at), "another leader");
        let newer = Point { term: 3, ..at.clone() };
        assert!(!follower_matches(&f, 1, &newer), "another term");
        let longer = Point {
            committed: Some(log_id(2, 1, 11)),
            ..at.clone()
        };
        assert!(!follower_matches(&f, 1, &longer), "another log");
        let mut lagging = f.clone();
        lagging.settled = false;
        assert!(!follower_matches(&lagging, 1, &at), "entries not yet committed");
        let mut candidate = f.clone();
        candidate.state = ServerState::Candidate;
        assert!(!follower_matches(&candidate, 1, &at));
        let mut stopped = f;
        stopped.running = false;
        assert!(!follower_matches(&stopped, 1, &at));
    }

    #[test]
    fn a_node_that_does_not_hibernate_refuses_every_group() {
        let req = LivenessRequest {
            from: 2,
            incarnation: 7,
            quiesced: vec![(5, leading().point), (9, leading().point)],
        };
        let reply = Hibernation::refuse_all(1, req);
        assert_eq!(reply.refused, vec![5, 9]);
        assert_eq!(reply.from, 1);
    }

    #[test]
    fn jitter_is_bounded_and_differs_between_replicas() {
        let cfg = HibernationConfig {
            liveness_interval: Duration::from_millis(200),
            liveness_timeout: Duration::from_secs(1),
            idle_after: Duration::from_secs(2),
            wake_jitter: Duration::from_millis(300),
        };
        let mut distinct = BTreeSet::new();
        for group in 0..200 {
            for node in 1..=3 {
                let j = cfg.jitter(group, node);
                assert!(j < Duration::from_millis(300), "{j:?}");
                distinct.insert(j.as_millis());
            }
        }
        assert!(
            distinct.len() > 200,
            "jitter spreads: {} distinct values",
            distinct.len()
        );
        assert_ne!(cfg.jitter(7, 1), cfg.jitter(7, 2));
        let none = HibernationConfig {
            wake_jitter: Duration::ZERO,
            ..cfg
        };
        assert_eq!(none.jitter(7, 1), Duration::ZERO);
    }

    #[test]
    fn a_peer_never_heard_from_is_alive_until_the_timeout() {
        let now = Instant::now();
        let p = PeerView::new(now);
        let t = Duration::from_secs(1);
        assert!(p.alive(now + Duration::from_millis(999), t));
        assert!(!p.alive(now + Duration::from_millis(1001), t));
    }
}
