//! Where each attempt of a call goes, and what its answer teaches: the strategies the retry loop
//! (`retry`) runs with.
//!
//! - [`ClusterRoute`] is for requests that are not about a key (admin calls, keyspace lookups):
//!   the [`Router`]'s endpoint rotation with leader hints, as before shards existed.
//! - [`KeyRoute`] is for key-value requests: the [`RoutingCache`] places the key in a shard, and
//!   the attempt goes to that shard's leader, else one of its replicas, else (the cache cannot
//!   place it) to the rotation. Answers feed the cache: a response header names the shard's
//!   leader, `NotLeader` hints move it, `WrongShard` brings a newer descriptor or invalidates
//!   the entry.
//!
//! Invariants and why:
//! - **The cache only chooses endpoints.** Every attempt sends the same request the caller built
//!   (writes keep their session sequence), so a stale cache costs attempts, never correctness:
//!   the server checks range and epoch and answers `WrongShard` or `NotLeader`, or forwards.
//! - **A stale entry never surfaces as an error.** `WrongShard` and `NotLeader` are retried
//!   like any transient failure, within the call's deadline; a node that fails or refuses the
//!   key is excluded for the rest of the call, and when the cache has nothing left to offer the
//!   attempt falls back to the rotation, which reaches every known endpoint in turn.
//! - **Lookups are bounded.** A call performs at most [`MAX_LOOKUPS_PER_CALL`] keyspace lookups,
//!   each within one attempt timeout and half the time left to the call; concurrent calls that miss on the
//!   same keyspace share one lookup (the cache's per-keyspace lock and generation), and after a
//!   failed lookup the keyspace is routed by rotation for a while (`LOOKUP_RETRY_AFTER`).
//! - **Evidence, not assumption, moves the leader.** The cached leader changes on a response
//!   header or a `NotLeader` hint naming a node, and is forgotten when an attempt on it fails
//!   or an election is reported; a leader whose endpoint is suspect (see [`Router`]) is passed
//!   over for a replica, which forwards.

use basalt_proto::v1::admin_client::AdminClient;
use basalt_proto::v1::{DescribeKeyspaceRequest, ResponseHeader, Shard, Sharding as WireSharding};
use tokio::time::Instant;

use crate::config::ClientConfig;
use crate::error::{replica_addrs, ClientError};
use crate::retry::{call_until, Deadline};
use crate::router::{Router, Target};
use crate::routing::{Event, Lookup, Merge, NodeRoute, ResolvedShard, RouteKey, RoutingCache, ShardRoute};

/// Keyspace lookups one call may perform: the first fill, and refreshes after answers that
/// showed the cache wrong.
pub(crate) const MAX_LOOKUPS_PER_CALL: u32 = 3;

/// A strategy for choosing each attempt's endpoint and learning from its outcome.
pub(crate) trait Route {
    /// The endpoint for the next attempt. May first look routes up, within `deadline`.
    async fn target(&mut self, deadline: Instant) -> Target;

    /// The attempt at `target` succeeded.
    fn on_success(&mut self, target: &Target, header: Option<&ResponseHeader>);

    /// The attempt at `target` was refused with a leader hint. Returns whether the next attempt
    /// should go at once (a usable hint to another endpoint) instead of after a backoff.
    fn on_not_leader(&mut self, target: &Target, leader_id: u64, leader_addr: &str) -> bool;

    /// `target` holds no replica of the key's shard; `current` is its descriptor as that node
    /// knows it. Returns whether the next attempt should go at once.
    fn on_wrong_shard(&mut self, target: &Target, current: Option<&Shard>) -> bool;

    /// The attempt at `target` failed without saying where to go (transport, timeout, overload).
    fn on_failure(&mut self, target: &Target);

    /// The call ends with a definite error.
    fn on_error(&mut self, _error: &ClientError) {}
}

/// Endpoint rotation with leader hints: for requests that are not about a key.
pub(crate) struct ClusterRoute<'a>(pub(crate) &'a Router);

impl Route for ClusterRoute<'_> {
    async fn target(&mut self, _deadline: Instant) -> Target {
        self.0.target()
    }

    fn on_success(&mut self, target: &Target, header: Option<&ResponseHeader>) {
        self.0.on_success(target.index, header);
    }

    fn on_not_leader(&mut self, target: &Target, leader_id: u64, leader_addr: &str) -> bool {
        self.0.on_not_leader(target.index, leader_id, leader_addr).is_some()
    }

    fn on_wrong_shard(&mut self, target: &Target, current: Option<&Shard>) -> bool {
        self.0.on_wrong_shard(target.index, &replica_addrs(current));
        false
    }

    fn on_failure(&mut self, target: &Target) {
        self.0.on_failure(target.index);
    }
}

/// What the cache said about the last attempt's key.
#[derive(Debug)]
struct Placed {
    /// The encoded key.
    key: Vec<u8>,
    /// The cached shard holding it, when there was one.
    shard: Option<ShardRoute>,
    /// The node the attempt went to, when the cache chose it.
    node: Option<u64>,
}

/// Routing by key through the shard cache (see the module documentation).
pub(crate) struct KeyRoute<'a> {
    router: &'a Router,
    cache: &'a RoutingCache,
    cfg: &'a ClientConfig,
    keyspace: &'a str,
    key: RouteKey,
    /// An answer showed the cache wrong in a way only a lookup can fix.
    want_lookup: bool,
    lookups: u32,
    /// Endpoints that failed or refused the key during this call.
    excluded: Vec<usize>,
    placed: Option<Placed>,
    /// Send attempts to the least loaded replica rather than the leader (reads that any replica
    /// may serve), tracking each attempt's load on the router.
    spread: bool,
    /// The spread attempt in flight: its slot and when it started.
    attempt: Option<(usize, Instant)>,
}

impl<'a> KeyRoute<'a> {
    pub(crate) fn new(
        router: &'a Router,
        cache: &'a RoutingCache,
        cfg: &'a ClientConfig,
        keyspace: &'a str,
        key: RouteKey,
    ) -> Self {
        Self {
            router,
            cache,
            cfg,
            keyspace,
            key,
            want_lookup: false,
            lookups: 0,
            excluded: Vec::new(),
            placed: None,
            spread: false,
            attempt: None,
        }
    }

    /// This route, sending attempts to the least loaded of the shard's replicas (fewest attempts
    /// in flight from this client, then the quickest to answer) instead of its leader.
    pub(crate) fn spread(mut self) -> Self {
        self.spread = true;
        self
    }

    /// The spread attempt in flight ended; `answered` says whether its time is a fair sample of
    /// the endpoint's answer time.
    fn attempt_ended(&mut self, answered: bool) {
        if let Some((slot, started)) = self.attempt.take() {
            self.router.finished(slot, answered.then(|| started.elapsed()));
        }
    }

    /// The endpoint for `shard`: its leader, else a replica; endpoints that are not suspect
    /// first, and never one excluded in this call. Returns the slot and the node id.
    fn pick(&self, shard: &ShardRoute) -> Option<(usize, u64)> {
        let usable = |n: &NodeRoute, suspect_ok: bool| {
            n.slot
                .filter(|s| !self.excluded.contains(s) && (suspect_ok || !self.router.is_suspect(*s)))
                .map(|s| (s, n.node_id))
        };
        if self.spread {
            return [false, true].into_iter().find_map(|suspect_ok| {
                // Answer times within a quarter millisecond count as equal, so that load decides.
                shard
                    .replicas
                    .iter()
                    .filter_map(|n| usable(n, suspect_ok))
                    .min_by_key(|(slot, _)| {
                        let (inflight, rtt_us) = self.router.load(*slot);
                        (inflight, rtt_us / 250)
                    })
            });
        }
        [false, true].into_iter().find_map(|suspect_ok| {
            shard
                .leader
                .iter()
                .chain(shard.replicas.iter())
                .find_map(|n| usable(n, suspect_ok))
        })
    }

    /// The slot of node `node_id` according to the shard's descriptor, else of `addr`.
    fn slot_of(&self, shard: &ShardRoute, node_id: u64, addr: &str) -> Option<usize> {
        shard
            .replicas
            .iter()
            .find(|r| r.node_id == node_id)
            .and_then(|r| r.slot)
            .or_else(|| self.router.resolve(addr))
    }

    /// Fills or refreshes the cache for this keyspace with one `DescribeKeyspace` (served by any
    /// node from its copy of the catalog), unless another call has just done so or a lookup
    /// failed recently. Failure is not an error: the attempt then goes by rotation.
    async fn look_up(&self, deadline: Instant) {
        let ticket = self.cache.ticket(self.keyspace);
        if !ticket.allowed {
            return;
        }
        let Ok(_guard) = tokio::time::timeout_at(deadline, ticket.lock.lock()).await else {
            return;
        };
        if self.cache.generation(self.keyspace) != ticket.generation {
            return;
        }
        let name = self.keyspace.to_owned();
        // At most half of what is left, so that the request itself always gets its turn (and a
        // lookup against a dead cluster cannot turn into a bare "no attempt was made").
        let left = deadline.saturating_duration_since(Instant::now());
        let window = Deadline::after(self.cfg.attempt_timeout.min(left / 2));
        let result = call_until(
            self.router,
            self.cfg,
            "routing_lookup",
            window,
            || DescribeKeyspaceRequest { name: name.clone() },
            |ch, req| async move { AdminClient::new(ch).describe_keyspace(req).await },
        )
        .await;
        let described = result.map_err(|e| e.to_string()).and_then(|resp| {
            let ks = resp.keyspace.ok_or("the answer has no keyspace")?;
            let hashed = match WireSharding::try_from(ks.sharding) {
                Ok(WireSharding::Hash) => true,
                Ok(WireSharding::Range) => false,
                _ => return Err(format!("unknown sharding {}", ks.sharding)),
            };
            Ok((ks.id, hashed, resp.shards))
        });
        match described {
            Ok((id, hashed, shards)) => {
                let shards = shards.iter().map(|s| resolve(self.router, s)).collect();
                self.cache
                    .apply_listing(self.keyspace, id, hashed, shards, Some(&self.key));
            }
            Err(error) => {
                tracing::debug!(keyspace = self.keyspace, %error, "routing lookup failed; routing by rotation");
                self.cache.lookup_failed(self.keyspace);
            }
        }
    }
}

impl Drop for KeyRoute<'_> {
    /// A call dropped mid-attempt (its deadline passed, its caller gave up) still ends the attempt
    /// it had in flight, so the endpoint's load does not count it for ever.
    fn drop(&mut self) {
        self.attempt_ended(false);
    }
}

/// A wire descriptor with its replica addresses resolved to router slots.
pub(crate) fn resolve(router: &Router, shard: &Shard) -> ResolvedShard {
    let replicas: Vec<NodeRoute> = shard
        .replicas
        .iter()
        .map(|r| NodeRoute {
            node_id: r.node_id,
            slot: router.resolve(&r.address),
        })
        .collect();
    let leader = (shard.leader_id != 0).then(|| {
        replicas
            .iter()
            .find(|r| r.node_id == shard.leader_id)
            .copied()
            .unwrap_or(NodeRoute {
                node_id: shard.leader_id,
                slot: None,
            })
    });
    ResolvedShard {
        id: shard.id,
        keyspace_id: shard.keyspace_id,
        start: shard.start.to_vec(),
        end: shard.end.to_vec(),
        epoch: shard.epoch,
        replicas,
        leader,
    }
}

impl Route for KeyRoute<'_> {
    async fn target(&mut self, deadline: Instant) -> Target {
        let mut lookup = self.cache.lookup(self.keyspace, &self.key);
        let missed = matches!(lookup, Lookup::UnknownKeyspace | Lookup::Miss { .. });
        if missed {
            self.cache.count(Event::Miss);
        }
        let due = matches!(lookup, Lookup::Hit { refresh_due: true, .. });
        let wanted = missed || ((self.want_lookup || due) && matches!(lookup, Lookup::Hit { .. }));
        if wanted && self.lookups < MAX_LOOKUPS_PER_CALL {
            self.lookups += 1;
            self.want_lookup = false;
            self.look_up(deadline).await;
            lookup = self.cache.lookup(self.keyspace, &self.key);
        }
        let (placed, slot) = match lookup {
            Lookup::Hit { key, shard, .. } => {
                let pick = self.pick(&shard);
                let placed = Placed {
                    key,
                    node: pick.map(|(_, node)| node),
                    shard: Some(shard),
                };
                (Some(placed), pick.map(|(slot, _)| slot))
            }
            Lookup::Miss { key } => (
                Some(Placed {
                    key,
                    shard: None,
                    node: None,
                }),
                None,
            ),
            Lookup::UnknownKeyspace | Lookup::Unroutable => (None, None),
        };
        self.placed = placed;
        self.attempt_ended(false);
        match slot {
            Some(slot) => {
                self.cache.count(Event::Hit);
                if self.spread {
                    self.router.started(slot);
                    self.attempt = Some((slot, Instant::now()));
                }
                self.router.target_at(slot)
            }
            None => {
                self.cache.count(Event::Fallback);
                self.router.target()
            }
        }
    }

    fn on_success(&mut self, target: &Target, header: Option<&ResponseHeader>) {
        self.attempt_ended(true);
        let Some(placed) = &self.placed else {
            self.router.on_success(target.index, header);
            return;
        };
        match (placed.node, header) {
            (Some(node), Some(h)) if h.node_id != 0 && h.node_id != node => {
                // Forwarded: the header is the leader's, not the contacted node's, so it must not
                // attribute the leader's id to the contacted endpoint.
                self.cache.count(Event::AnsweredElsewhere);
                let leader = placed.shard.as_ref().and_then(|s| s.leader).map(|l| l.node_id);
                if leader == Some(node) {
                    // The node the cache named as leader is not: leadership moved, or the entry
                    // is a shard that has split (see `routing`).
                    self.cache.hint_refresh(self.keyspace);
                }
                let h = ResponseHeader {
                    node_id: 0,
                    ..h.clone()
                };
                self.router.on_success(target.index, Some(&h));
            }
            (Some(_), Some(h)) if h.node_id != 0 => {
                self.cache.count(Event::AnsweredByTarget);
                self.router.on_success(target.index, header);
            }
            _ => self.router.on_success(target.index, header),
        }
        let (Some(h), Some(shard)) = (header, &placed.shard) else {
            return;
        };
        if h.leader_id != 0 && shard.leader.map(|l| l.node_id) != Some(h.leader_id) {
            let slot = self.slot_of(shard, h.leader_id, &h.leader_addr);
            self.cache.set_leader(
                self.keyspace,
                &placed.key,
                shard.id,
                NodeRoute {
                    node_id: h.leader_id,
                    slot,
                },
            );
        }
    }

    fn on_not_leader(&mut self, target: &Target, leader_id: u64, leader_addr: &str) -> bool {
        self.attempt_ended(true);
        let followed = self.router.on_not_leader(target.index, leader_id, leader_addr);
        let Some((key, shard)) = self
            .placed
            .as_ref()
            .and_then(|p| p.shard.as_ref().map(|s| (p.key.clone(), s.clone())))
        else {
            return followed.is_some();
        };
        if leader_id == 0 {
            // An election: whoever the cache thought led may not any more.
            self.cache.clear_leader(self.keyspace, &key, shard.id, None);
            return false;
        }
        let slot = self.slot_of(&shard, leader_id, leader_addr).or(followed);
        self.cache.set_leader(
            self.keyspace,
            &key,
            shard.id,
            NodeRoute {
                node_id: leader_id,
                slot,
            },
        );
        match slot {
            Some(s) if s != target.index => {
                // The hint is newer evidence than this call's earlier failure there.
                self.excluded.retain(|e| *e != s);
                true
            }
            _ => false,
        }
    }

    fn on_wrong_shard(&mut self, target: &Target, current: Option<&Shard>) -> bool {
        self.attempt_ended(true);
        self.cache.count(Event::WrongShard);
        self.router.on_wrong_shard(target.index, &replica_addrs(current));
        if !self.excluded.contains(&target.index) {
            self.excluded.push(target.index);
        }
        let key = self.placed.as_ref().map(|p| p.key.as_slice());
        let Some(current) = current else {
            if let Some(key) = key {
                self.cache.invalidate(self.keyspace, key);
            }
            self.want_lookup = true;
            return false;
        };
        let descriptor = resolve(self.router, current);
        let covers = key.is_some_and(|k| descriptor.contains(k));
        let merged = self.cache.merge(self.keyspace, descriptor.clone());
        if merged == Merge::Applied && covers {
            // Go straight to the shard the answer described, unless it names only nodes this
            // call has already been refused by (then a backoff gives them time).
            let shard = ShardRoute {
                id: descriptor.id,
                epoch: descriptor.epoch,
                leader: descriptor.leader,
                replicas: descriptor.replicas,
            };
            return self.pick(&shard).is_some();
        }
        // The node's view is no newer than the cache's, or about another shard or incarnation
        // of the keyspace: only a fresh listing can settle it.
        self.want_lookup = true;
        false
    }

    fn on_failure(&mut self, target: &Target) {
        self.attempt_ended(false);
        self.router.on_failure(target.index);
        if !self.excluded.contains(&target.index) {
            self.excluded.push(target.index);
        }
        if let Some(Placed {
            key,
            shard: Some(shard),
            ..
        }) = &self.placed
        {
            if let Some(leader) = shard.leader.filter(|l| l.slot == Some(target.index)) {
                self.cache
                    .clear_leader(self.keyspace, key, shard.id, Some(leader.node_id));
            }
        }
    }

    fn on_error(&mut self, error: &ClientError) {
        self.attempt_ended(false);
        // The keyspace does not exist (any more): its routes are of no use, and if it is
        // re-created it gets another id.
        if matches!(
            error,
            ClientError::Server {
                code: tonic::Code::NotFound,
                ..
            }
        ) {
            self.cache.forget(self.keyspace);
        }
    }
}
