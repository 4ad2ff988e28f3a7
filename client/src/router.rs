//! Leader discovery: which endpoint the next attempt goes to.
//!
//! The router owns one lazily connected tonic [`Channel`] per known endpoint (the seeds, plus every
//! leader address learned from a `NotLeader` hint) and a small routing cache: the endpoint that
//! last worked or that a hint named ("preferred"), the leader id last heard of, and a rotation
//! cursor used when nothing is preferred.
//!
//! Invariants:
//! - Endpoints are only ever appended, so an index handed out in a [`Target`] stays valid for
//!   the reports that come back about it, however many tasks share the router. Endpoints are
//!   deduplicated on their canonical form, and a misbehaving server cannot make the list grow
//!   past [`MAX_ENDPOINTS`].
//! - `preferred` is only set by evidence: a successful response from that endpoint, or a
//!   `NotLeader` hint naming it. A successful response that names a different leader does not
//!   redirect the client: the endpoint it came from works (it forwarded the request), whereas the
//!   leader's advertised address might not be reachable from here, and chasing it would cost an
//!   attempt timeout on every call.
//! - A failure at the preferred endpoint clears the preference and moves the cursor past the
//!   failed endpoint, so consecutive failures walk through every endpoint in turn.
//! - A `WrongShard` answer is a failure of that endpoint for this request, not a hint: the
//!   replica addresses it names are learned (so the rotation reaches nodes that the seeds do not
//!   list) but not preferred, because the answering node's view of the shard may be stale and
//!   this state is per cluster, not per shard; preferring them would move every other
//!   keyspace's traffic along with it. Per-shard routing is the shard cache's business (see
//!   `routing` and `route`), which addresses endpoints through [`Router::resolve`] and
//!   [`Router::target_at`].
//! - An endpoint whose attempt failed (transport error, timeout, refusal) is *suspect* for
//!   [`SUSPECT_FOR`] unless it succeeds again meanwhile. The rotation ignores this (it must keep
//!   probing every endpoint), but the shard cache skips suspect replicas while others are left,
//!   so a dead or unreachable replica costs one attempt timeout per period rather than one per
//!   request.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use basalt_proto::v1::ResponseHeader;
use basalt_proto::Dialer;
use parking_lot::RwLock;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::endpoint::EndpointAddr;

/// How often an active connection is pinged (see `lazy_channel`).
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);

/// Upper bound on known endpoints; hints naming further new addresses are ignored.
pub(crate) const MAX_ENDPOINTS: usize = 256;

/// How long an endpoint stays suspect after a failed attempt (see the module invariants).
pub(crate) const SUSPECT_FOR: Duration = Duration::from_secs(3);

/// Where one attempt goes.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub(crate) index: usize,
    pub(crate) addr: String,
    pub(crate) channel: Channel,
}

#[derive(Debug)]
struct Slot {
    addr: EndpointAddr,
    channel: Channel,
    /// The node id this endpoint reported (response header) or a hint attributed to it.
    node_id: Option<u64>,
    /// Until when the endpoint is suspect after a failed attempt.
    suspect_until: Option<Instant>,
    /// Load figures for spreading reads any replica may serve (see [`Router::load`]).
    load: Load,
}

/// What the client knows of an endpoint's load: attempts in flight to it from this client, and
/// a moving average of its answer time. Atomics, so that attempts update it under the read lock.
#[derive(Debug, Default)]
struct Load {
    inflight: AtomicU32,
    /// Exponentially weighted (1/8) answer time in µs; 0 until the first answer.
    rtt_us: AtomicU64,
}

#[derive(Debug)]
struct RouterState {
    /// Never empty: `Router::new` takes at least one seed and nothing removes slots.
    slots: Vec<Slot>,
    preferred: Option<usize>,
    leader_id: Option<u64>,
    cursor: usize,
}

/// The routing cache shared by every clone of a client.
#[derive(Debug)]
pub(crate) struct Router {
    attempt_timeout: Duration,
    dialer: Dialer,
    state: RwLock<RouterState>,
}

impl Router {
    /// Builds channels for the seeds. `seeds` must be non-empty (guaranteed by
    /// `ClientConfig::validate`), and this must run inside a tokio runtime because a lazy channel
    /// spawns its worker task.
    pub(crate) fn new(seeds: Vec<EndpointAddr>, attempt_timeout: Duration, dialer: Dialer) -> Self {
        debug_assert!(!seeds.is_empty(), "validated configs have endpoints");
        let slots = seeds
            .into_iter()
            .map(|addr| Slot {
                channel: lazy_channel(&addr, attempt_timeout, &dialer),
                addr,
                node_id: None,
                suspect_until: None,
                load: Load::default(),
            })
            .collect();
        Self {
            attempt_timeout,
            dialer,
            state: RwLock::new(RouterState {
                slots,
                preferred: None,
                leader_id: None,
                cursor: 0,
            }),
        }
    }

    /// The endpoint for the next attempt: the preferred one, else the next in rotation.
    pub(crate) fn target(&self) -> Target {
        let state = self.state.read();
        let index = state.preferred.unwrap_or(state.cursor % state.slots.len());
        let slot = &state.slots[index];
        Target {
            index,
            addr: slot.addr.as_str().to_owned(),
            channel: slot.channel.clone(),
        }
    }

    /// The endpoint at `index`, an index this router handed out (slots are never removed).
    pub(crate) fn target_at(&self, index: usize) -> Target {
        let state = self.state.read();
        let slot = &state.slots[index % state.slots.len()];
        Target {
            index,
            addr: slot.addr.as_str().to_owned(),
            channel: slot.channel.clone(),
        }
    }

    /// The slot of endpoint `raw`, added if new (within [`MAX_ENDPOINTS`]); `None` when the
    /// address is empty or malformed, or the list is full.
    pub(crate) fn resolve(&self, raw: &str) -> Option<usize> {
        if raw.is_empty() {
            return None;
        }
        let addr = match EndpointAddr::parse(raw) {
            Ok(addr) => addr,
            Err(err) => {
                tracing::debug!(%raw, error = %err, "ignoring malformed replica address");
                return None;
            }
        };
        if let Some(i) = self.state.read().slots.iter().position(|s| s.addr == addr) {
            return Some(i);
        }
        self.state.write().find_or_add(addr, self.attempt_timeout, &self.dialer)
    }

    /// An attempt to the endpoint at `index` starts (for [`Router::load`]).
    pub(crate) fn started(&self, index: usize) {
        if let Some(s) = self.state.read().slots.get(index) {
            s.load.inflight.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An attempt to the endpoint at `index` ended, answered after `rtt` if it was answered.
    pub(crate) fn finished(&self, index: usize, rtt: Option<Duration>) {
        let state = self.state.read();
        let Some(s) = state.slots.get(index) else { return };
        // Never below zero, whatever the order of reports.
        let _ = s
            .load
            .inflight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(1)));
        if let Some(rtt) = rtt {
            let sample = (rtt.as_micros() as u64).max(1);
            let _ = s.load.rtt_us.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 { sample } else { (old * 7 + sample) / 8 })
            });
        }
    }

    /// The load of the endpoint at `index`: attempts in flight from this client, and its average
    /// answer time in µs (0: never answered). Reads any replica may serve go to the replica with
    /// the fewest in flight, then the quickest (the nearest).
    pub(crate) fn load(&self, index: usize) -> (u32, u64) {
        let state = self.state.read();
        state.slots.get(index).map_or((u32::MAX, u64::MAX), |s| {
            (
                s.load.inflight.load(Ordering::Relaxed),
                s.load.rtt_us.load(Ordering::Relaxed),
            )
        })
    }

    /// Whether the endpoint at `index` failed an attempt within the last [`SUSPECT_FOR`].
    pub(crate) fn is_suspect(&self, index: usize) -> bool {
        let state = self.state.read();
        state
            .slots
            .get(index)
            .and_then(|s| s.suspect_until)
            .is_some_and(|until| Instant::now() < until)
    }

    /// The leader's node id, as last heard from a response header or a `NotLeader` hint.
    pub(crate) fn leader_id(&self) -> Option<u64> {
        self.state.read().leader_id
    }

    /// Every known endpoint, seeds first, then learned ones in the order they were learned.
    pub(crate) fn endpoints(&self) -> Vec<String> {
        let state = self.state.read();
        state.slots.iter().map(|s| s.addr.as_str().to_owned()).collect()
    }

    /// The endpoint at `index` answered successfully.
    pub(crate) fn on_success(&self, index: usize, header: Option<&ResponseHeader>) {
        let mut state = self.state.write();
        state.preferred = Some(index);
        if let Some(slot) = state.slots.get_mut(index) {
            slot.suspect_until = None;
        }
        let Some(header) = header else { return };
        if header.node_id != 0 {
            state.attribute(index, header.node_id);
        }
        if header.leader_id != 0 {
            state.leader_id = Some(header.leader_id);
        }
    }

    /// The attempt at `index` failed without telling us where the leader is.
    pub(crate) fn on_failure(&self, index: usize) {
        let mut state = self.state.write();
        if let Some(slot) = state.slots.get_mut(index) {
            slot.suspect_until = Some(Instant::now() + SUSPECT_FOR);
        }
        state.rotate_past(index);
    }

    /// The endpoint at `index` said it is not the leader. Returns the endpoint the hint points
    /// to when it is usable and different from `index`; otherwise the failure is treated like any
    /// other and `None` is returned.
    pub(crate) fn on_not_leader(&self, index: usize, leader_id: u64, leader_addr: &str) -> Option<usize> {
        let mut state = self.state.write();
        if leader_id == 0 {
            // An election is under way; whoever we thought led may not any more.
            state.leader_id = None;
            state.rotate_past(index);
            return None;
        }
        state.leader_id = Some(leader_id);
        // An empty or malformed address fails to parse; the id may still name a known endpoint.
        let hinted = EndpointAddr::parse(leader_addr)
            .ok()
            .and_then(|addr| state.find_or_add(addr, self.attempt_timeout, &self.dialer))
            .or_else(|| state.slot_of_node(leader_id));
        match hinted {
            Some(target) if target != index => {
                state.attribute(target, leader_id);
                state.preferred = Some(target);
                Some(target)
            }
            // The node names itself: it won an election while handling the attempt (a follower
            // abandons a forward once leadership moves, possibly to itself). Ask it again after
            // the usual backoff instead of rotating onto nodes that may be down.
            Some(_) => {
                state.attribute(index, leader_id);
                state.preferred = Some(index);
                None
            }
            None => {
                state.rotate_past(index);
                None
            }
        }
    }
}

impl Router {
    /// The endpoint at `index` holds no replica for the request's shard. Learns the addresses of
    /// the replicas it named (bounded by [`MAX_ENDPOINTS`]; malformed ones are skipped) and moves
    /// on like any other failure.
    pub(crate) fn on_wrong_shard(&self, index: usize, replica_addrs: &[String]) {
        let mut state = self.state.write();
        for raw in replica_addrs {
            match EndpointAddr::parse(raw) {
                Ok(addr) => {
                    state.find_or_add(addr, self.attempt_timeout, &self.dialer);
                }
                Err(err) => tracing::debug!(%raw, error = %err, "ignoring malformed replica address"),
            }
        }
        state.rotate_past(index);
    }
}

impl RouterState {
    fn rotate_past(&mut self, index: usize) {
        if self.preferred == Some(index) {
            self.preferred = None;
        }
        self.cursor = (index + 1) % self.slots.len();
    }

    /// Records that `index` is node `node_id`, and that no other endpoint is (a node that moved
    /// address must not be found under its old one).
    fn attribute(&mut self, index: usize, node_id: u64) {
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if i == index {
                slot.node_id = Some(node_id);
            } else if slot.node_id == Some(node_id) {
                slot.node_id = None;
            }
        }
    }

    fn slot_of_node(&self, node_id: u64) -> Option<usize> {
        self.slots.iter().position(|s| s.node_id == Some(node_id))
    }

    fn find_or_add(&mut self, addr: EndpointAddr, attempt_timeout: Duration, dialer: &Dialer) -> Option<usize> {
        if let Some(i) = self.slots.iter().position(|s| s.addr == addr) {
            return Some(i);
        }
        if self.slots.len() >= MAX_ENDPOINTS {
            tracing::warn!(%addr, "ignoring leader hint: endpoint limit reached");
            return None;
        }
        tracing::debug!(%addr, "learned endpoint from leader hint");
        self.slots.push(Slot {
            channel: lazy_channel(&addr, attempt_timeout, dialer),
            addr,
            node_id: None,
            suspect_until: None,
            load: Load::default(),
        });
        Some(self.slots.len() - 1)
    }
}

fn lazy_channel(addr: &EndpointAddr, attempt_timeout: Duration, dialer: &Dialer) -> Channel {
    // HTTP/2 pings detect a connection that silently stopped delivering (a partition, a dropped
    // NAT flow), which otherwise fails every later attempt on it with a timeout; once the ping
    // fails, the next attempt reconnects.
    dialer.channel(
        addr.endpoint()
            .clone()
            .connect_timeout(attempt_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(attempt_timeout)
            .keep_alive_while_idle(false),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(addrs: &[&str]) -> Router {
        let seeds = addrs
            .iter()
            .map(|a| EndpointAddr::parse(a).expect("test addresses are valid"))
            .collect();
        Router::new(seeds, Duration::from_millis(100), Dialer::Tcp)
    }

    fn header(node_id: u64, leader_id: u64) -> ResponseHeader {
        ResponseHeader {
            node_id,
            leader_id,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn load_counts_attempts_in_flight_and_averages_answer_times() {
        let r = router(&["a:1", "b:2"]);
        assert_eq!(r.load(0), (0, 0), "nothing known yet");
        r.started(0);
        r.started(0);
        assert_eq!(r.load(0).0, 2);
        r.finished(0, Some(Duration::from_micros(800)));
        assert_eq!(r.load(0), (1, 800), "the first answer sets the average");
        r.finished(0, Some(Duration::from_micros(1_600)));
        assert_eq!(r.load(0), (0, 900), "then it moves by an eighth");
        r.finished(0, None);
        assert_eq!(
            r.load(0),
            (0, 900),
            "never below zero; an unanswered attempt is no sample"
        );
        assert_eq!(
            r.load(7),
            (u32::MAX, u64::MAX),
            "an unknown slot is never the least loaded"
        );
    }

    #[tokio::test]
    async fn failures_rotate_through_every_endpoint() {
        let r = router(&["a:1", "b:2", "c:3"]);
        let mut seen = Vec::new();
        for _ in 0..4 {
            let t = r.target();
            seen.push(t.addr.clone());
            r.on_failure(t.index);
        }
        assert_eq!(seen, ["a:1", "b:2", "c:3", "a:1"]);
    }

    #[tokio::test]
    async fn success_sticks_and_records_the_leader() {
        let r = router(&["a:1", "b:2"]);
        r.on_failure(0);
        let t = r.target();
        assert_eq!(t.addr, "b:2");
        r.on_success(t.index, Some(&header(2, 2)));
        assert_eq!(r.leader_id(), Some(2));
        assert_eq!(r.target().addr, "b:2");
        assert_eq!(r.target().addr, "b:2");
    }

    #[tokio::test]
    async fn success_from_a_forwarding_follower_does_not_redirect() {
        let r = router(&["a:1", "b:2"]);
        r.on_success(0, Some(&header(1, 2)));
        assert_eq!(r.leader_id(), Some(2));
        assert_eq!(r.target().addr, "a:1");
    }

    #[tokio::test]
    async fn not_leader_hint_adds_and_prefers_the_leader() {
        let r = router(&["a:1"]);
        assert_eq!(r.on_not_leader(0, 7, "http://z:9"), Some(1));
        assert_eq!(r.leader_id(), Some(7));
        assert_eq!(r.target().addr, "z:9");
        assert_eq!(r.endpoints(), ["a:1", "z:9"]);
        // The same hint again does not add a second channel.
        r.on_failure(1);
        assert_eq!(r.on_not_leader(0, 7, "z:9"), Some(1));
        assert_eq!(r.endpoints().len(), 2);
    }

    #[tokio::test]
    async fn hint_without_address_uses_a_known_node_id() {
        let r = router(&["a:1", "b:2"]);
        r.on_success(1, Some(&header(2, 2)));
        assert_eq!(r.on_not_leader(0, 2, ""), Some(1));
        assert_eq!(r.target().addr, "b:2");
        // Unknown id and no address: nothing to follow, rotate instead.
        assert_eq!(r.on_not_leader(1, 9, ""), None);
        assert_eq!(r.target().addr, "a:1");
    }

    #[tokio::test]
    async fn hints_that_cannot_help_rotate() {
        let r = router(&["a:1", "b:2"]);
        // Election: no leader.
        r.on_success(0, Some(&header(1, 1)));
        assert_eq!(r.on_not_leader(0, 0, ""), None);
        assert_eq!(r.leader_id(), None);
        assert_eq!(r.target().addr, "b:2");
        // A malformed address with an unknown id.
        assert_eq!(r.on_not_leader(1, 4, "not an address"), None);
        assert_eq!(r.target().addr, "a:1");
    }

    #[tokio::test]
    async fn a_node_naming_itself_leader_is_asked_again() {
        let r = router(&["a:1", "b:2"]);
        // b:2 became leader while handling the attempt: no immediate redirect (the caller backs
        // off), and b:2 stays the target rather than rotating to a:1.
        assert_eq!(r.on_not_leader(1, 3, "b:2"), None);
        assert_eq!(r.target().addr, "b:2");
        assert_eq!(r.leader_id(), Some(3));
    }

    #[tokio::test]
    async fn node_ids_move_with_their_address() {
        let r = router(&["a:1", "b:2"]);
        r.on_success(0, Some(&header(5, 5)));
        r.on_success(1, Some(&header(5, 5)));
        assert_eq!(r.on_not_leader(0, 5, ""), Some(1));
    }

    #[tokio::test]
    async fn wrong_shard_learns_replicas_and_rotates_without_preferring_them() {
        let r = router(&["a:1", "b:2"]);
        r.on_success(0, Some(&header(1, 1)));
        r.on_wrong_shard(0, &["c:3".into(), "not an address".into(), "http://b:2".into()]);
        assert_eq!(r.endpoints(), ["a:1", "b:2", "c:3"]);
        // The preference for a:1 is gone; rotation continues after it, then reaches c:3.
        let t = r.target();
        assert_eq!(t.addr, "b:2");
        r.on_wrong_shard(t.index, &[]);
        assert_eq!(r.target().addr, "c:3");
        // Leadership knowledge is untouched: WrongShard says nothing about the leader.
        assert_eq!(r.leader_id(), Some(1));
    }

    #[tokio::test]
    async fn resolve_adds_once_and_rejects_junk() {
        let r = router(&["a:1"]);
        assert_eq!(r.resolve("a:1"), Some(0));
        assert_eq!(r.resolve("http://b:2/"), Some(1));
        assert_eq!(r.resolve("b:2"), Some(1));
        assert_eq!(r.resolve(""), None);
        assert_eq!(r.resolve("fake"), None);
        assert_eq!(r.endpoints(), ["a:1", "b:2"]);
        assert_eq!(r.target_at(1).addr, "b:2");
        // Resolving does not change where the rotation goes.
        assert_eq!(r.target().addr, "a:1");
    }

    #[tokio::test]
    async fn failures_make_an_endpoint_suspect_until_it_succeeds() {
        let r = router(&["a:1", "b:2"]);
        assert!(!r.is_suspect(0));
        r.on_failure(0);
        assert!(r.is_suspect(0));
        assert!(!r.is_suspect(1));
        r.on_success(0, None);
        assert!(!r.is_suspect(0));
        assert!(!r.is_suspect(7), "unknown slots are not suspect");
    }

    #[tokio::test]
    async fn suspicion_expires() {
        let r = router(&["a:1"]);
        r.on_failure(0);
        // As if SUSPECT_FOR had passed since the failure.
        r.state.write().slots[0].suspect_until = Some(Instant::now());
        assert!(!r.is_suspect(0));
    }

    #[tokio::test]
    async fn endpoint_list_is_capped() {
        let r = router(&["a:1"]);
        for port in 1..(MAX_ENDPOINTS as u16 + 10) {
            r.on_not_leader(0, 1, &format!("h:{port}"));
        }
        assert_eq!(r.endpoints().len(), MAX_ENDPOINTS);
    }
}
