//! The shard routing cache: which shard holds a key, who replicates it, and who leads it.
//!
//! Per keyspace name the cache holds the keyspace's id and kind (needed to encode keys with
//! [`keycodec`], exactly as the server does) and shard descriptors ordered by their start key:
//! `[start, end)` of encoded keys (an empty `end` is the end of the keyspace), epoch, replicas
//! and the last known leader. Replicas and leader carry the router slot of their address,
//! resolved once when the descriptor is learned, so choosing an endpoint costs no parsing.
//!
//! This module is pure bookkeeping: it performs no I/O. The per-request logic that fills it
//! (a `DescribeKeyspace` on first use and on a miss), feeds it from answers (`WrongShard`
//! descriptors, `NotLeader` hints, response headers) and picks endpoints from it lives in
//! `route`.
//!
//! Invariants and why:
//! - **No overlap**: the cached shards of one keyspace never overlap, after any sequence of
//!   updates. A descriptor is admitted only if its epoch is at least that of every cached shard
//!   it overlaps, and then replaces all of them. Epochs grow along every shard's lineage (split
//!   halves take the parent's epoch + 1, and a merge or replica change bumps it too), so of two
//!   overlapping descriptors the one with the higher epoch is the newer; an equal epoch over an
//!   overlapping range can only be the same shard, re-described by a node that may know its
//!   leader better. A stale descriptor (a node behind the cluster) can therefore never displace
//!   a newer one, and a lookup finds at most one shard.
//! - **Gaps are allowed**: a dropped stale entry or an ignored descriptor leaves keys uncovered;
//!   a lookup of such a key is a miss and the route layer refreshes. Being wrong is always
//!   recoverable: the server checks range and epoch on every request and answers `WrongShard`
//!   or `NotLeader`, so the cache affects where a request goes first, never what it does.
//! - **Bounded memory**: at most [`MAX_SHARDS_PER_KEYSPACE`] shards per keyspace and
//!   [`MAX_KEYSPACES`] keyspaces. Past either bound the least recently used entry is evicted
//!   (a listing larger than the bound keeps the window of shards around the key that prompted
//!   it). An evicted shard costs a refresh on its next use, nothing more.
//! - **Keyspace identity**: a descriptor whose keyspace id differs from the cached one (the
//!   keyspace was dropped and re-created under the same name) is not merged; it marks the
//!   keyspace for a refresh, which replaces its routes wholesale.
//! - **Silent staleness is noticed**: where every node holds a replica of every shard, a split
//!   never produces `WrongShard` (the node the client picked hosts both halves and serves or
//!   forwards), so a stale entry would keep sending half of its keys to the other half's
//!   leader. The route layer reports an answer forwarded by the very node the cache named as
//!   leader ([`RoutingCache::hint_refresh`]); the keyspace is then looked up again on its next
//!   use, at most once per [`HINTED_REFRESH_INTERVAL`], which also covers a plain leader change.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use basalt_proto::keycodec;
use bytes::Bytes;
use parking_lot::RwLock;
use tokio::time::Instant;

/// Cached shards per keyspace. A keyspace with more shards keeps the most recently used ones;
/// 1,024 descriptors of a few hundred bytes each keep a keyspace's routes under about 0.5 MiB.
pub const MAX_SHARDS_PER_KEYSPACE: usize = 1024;

/// Keyspaces whose routes are cached at once (least recently used evicted first).
pub const MAX_KEYSPACES: usize = 64;

/// After a failed keyspace lookup (server down, old server, unknown keyspace), requests for the
/// keyspace go by endpoint rotation for this long before the cache asks again, so a keyspace
/// that cannot be looked up does not double the cost of every request.
pub(crate) const LOOKUP_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The least time between two lookups of a keyspace prompted by forwarded answers (see the
/// module invariants), so that leaders moving about cannot turn every request into a lookup.
pub(crate) const HINTED_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// A node of a shard, with the router slot of its address when that is known and well formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NodeRoute {
    pub(crate) node_id: u64,
    pub(crate) slot: Option<usize>,
}

/// A shard descriptor ready to be cached: the wire `Shard` with its addresses resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ResolvedShard {
    pub(crate) id: u64,
    pub(crate) keyspace_id: u32,
    pub(crate) start: Vec<u8>,
    /// Empty: the end of the keyspace.
    pub(crate) end: Vec<u8>,
    pub(crate) epoch: u64,
    pub(crate) replicas: Vec<NodeRoute>,
    pub(crate) leader: Option<NodeRoute>,
}

impl ResolvedShard {
    /// Whether `[start, end)` holds the encoded key `key`.
    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        self.start.as_slice() <= key && (self.end.is_empty() || key < self.end.as_slice())
    }

    /// A descriptor whose range is empty or inverted cannot be placed without breaking the order
    /// of the map; it is ignored.
    fn well_formed(&self) -> bool {
        self.end.is_empty() || self.start < self.end
    }
}

/// What a request needs to know about the shard of its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ShardRoute {
    pub(crate) id: u64,
    pub(crate) epoch: u64,
    pub(crate) leader: Option<NodeRoute>,
    pub(crate) replicas: Vec<NodeRoute>,
}

/// The key a request is routed by.
#[derive(Clone, Debug)]
pub(crate) enum RouteKey {
    /// A user key (point reads and writes).
    User(Bytes),
    /// Where a scan reads next: its cursor (a stored key), or the range's first position.
    Scan { cursor: Bytes, start: Bytes },
}

impl RouteKey {
    /// The stored key the server will route this request by, or `None` when it cannot be placed
    /// in this keyspace (a cursor that belongs to another one: the server rejects it anyway).
    pub(crate) fn encode(&self, keyspace_id: u32, hashed: bool) -> Option<Vec<u8>> {
        match self {
            RouteKey::User(key) => Some(keycodec::encode_key(keyspace_id, hashed, key)),
            RouteKey::Scan { cursor, start } => {
                let cursor = (!cursor.is_empty()).then_some(cursor.as_ref());
                let position = keycodec::scan_position(keyspace_id, hashed, cursor, start);
                position.starts_with(&keyspace_id.to_be_bytes()).then_some(position)
            }
        }
    }
}

/// The answer to a lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// The keyspace's id and kind are not cached: it must be looked up first.
    UnknownKeyspace,
    /// The key cannot be placed in the keyspace (see [`RouteKey::encode`]).
    Unroutable,
    /// No cached shard covers the encoded key.
    Miss { key: Vec<u8> },
    /// The cached shard that covers the encoded key. `refresh_due`: answers suggested the
    /// keyspace's routes are out of date, and it is time to look them up again.
    Hit {
        key: Vec<u8>,
        shard: ShardRoute,
        refresh_due: bool,
    },
}

/// What became of a descriptor offered to [`RoutingCache::merge`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Merge {
    /// Cached, replacing the shards it overlapped.
    Applied,
    /// Not newer than what is cached (or malformed): ignored.
    Ignored,
    /// For another incarnation of the keyspace, or for a keyspace not cached: the keyspace is
    /// marked for a refresh.
    Refresh,
}

/// The lookup state of one keyspace for the route layer: whether a lookup may start now, and
/// the generation to compare after waiting for `lock` (a changed generation means another task
/// has just finished a lookup, so this one need not repeat it).
#[derive(Clone, Debug)]
pub(crate) struct LookupTicket {
    pub(crate) lock: Arc<tokio::sync::Mutex<()>>,
    pub(crate) generation: u64,
    /// False within [`LOOKUP_RETRY_AFTER`] of a failed lookup.
    pub(crate) allowed: bool,
}

/// Counters of the routing cache's activity, for tests and diagnostics. All are totals since
/// the client was created, shared by every handle of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoutingStats {
    /// Attempts sent to an endpoint the cache chose (the shard's leader, else a replica).
    pub hits: u64,
    /// Lookups that found no cached shard for the key (or no cached keyspace).
    pub misses: u64,
    /// Attempts sent by endpoint rotation because the cache could not place them.
    pub fallbacks: u64,
    /// Keyspace lookups (`DescribeKeyspace`) that filled or refreshed the cache.
    pub refreshes: u64,
    /// Keyspace lookups that failed; the keyspace is then routed by rotation for a while.
    pub refresh_failures: u64,
    /// `WrongShard` answers received for routed requests.
    pub wrong_shard: u64,
    /// Descriptors from `WrongShard` answers that replaced cached shards.
    pub descriptor_updates: u64,
    /// Leader changes learned from `NotLeader` hints and response headers.
    pub leader_updates: u64,
    /// Successful answers from the very node the cache chose (no forwarding).
    pub answered_by_target: u64,
    /// Successful answers the chosen node got from another one (it forwarded to the leader).
    pub answered_elsewhere: u64,
    /// Shards and keyspaces dropped to stay within the bounds.
    pub evictions: u64,
}

/// A cached shard, as [`crate::Client::cached_shards`] shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedShard {
    pub id: u64,
    /// Encoded start key (see `basalt_proto::keycodec`).
    pub start: Bytes,
    /// Encoded end key; empty is the end of the keyspace.
    pub end: Bytes,
    pub epoch: u64,
    /// Replica node ids.
    pub replicas: Vec<u64>,
    /// The leader as last learned, if any.
    pub leader_id: Option<u64>,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    fallbacks: AtomicU64,
    refreshes: AtomicU64,
    refresh_failures: AtomicU64,
    wrong_shard: AtomicU64,
    descriptor_updates: AtomicU64,
    leader_updates: AtomicU64,
    answered_by_target: AtomicU64,
    answered_elsewhere: AtomicU64,
    evictions: AtomicU64,
}

/// Which counter [`RoutingCache::count`] bumps.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Event {
    Hit,
    Miss,
    Fallback,
    Refresh,
    RefreshFailure,
    WrongShard,
    AnsweredByTarget,
    AnsweredElsewhere,
}

struct Entry {
    shard: ResolvedShard,
    last_used: AtomicU64,
}

struct Routes {
    keyspace_id: u32,
    hashed: bool,
    /// By start key; never overlapping (module invariant).
    shards: BTreeMap<Vec<u8>, Entry>,
}

struct KeyspaceSlot {
    routes: Option<Routes>,
    /// A descriptor said the cached routes are for another incarnation of the keyspace.
    stale: bool,
    /// Completed lookups (successful or not).
    generation: u64,
    failed_at: Option<Instant>,
    /// When routes were last looked up successfully.
    looked_up_at: Option<Instant>,
    /// A forwarded answer suggested the routes are out of date.
    refresh_hint: bool,
    lock: Arc<tokio::sync::Mutex<()>>,
    last_used: AtomicU64,
}

impl KeyspaceSlot {
    fn new(tick: u64) -> Self {
        Self {
            routes: None,
            stale: false,
            generation: 0,
            failed_at: None,
            looked_up_at: None,
            refresh_hint: false,
            lock: Arc::new(tokio::sync::Mutex::new(())),
            last_used: AtomicU64::new(tick),
        }
    }
}

/// The routing cache shared by every handle of a client.
pub(crate) struct RoutingCache {
    keyspaces: RwLock<HashMap<String, KeyspaceSlot>>,
    counters: Counters,
    /// Logical clock for least-recently-used eviction.
    clock: AtomicU64,
    shard_cap: usize,
    keyspace_cap: usize,
}

impl std::fmt::Debug for RoutingCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutingCache")
            .field("keyspaces", &self.keyspaces.read().len())
            .field("stats", &self.stats())
            .finish()
    }
}

impl RoutingCache {
    pub(crate) fn new() -> Self {
        Self::with_caps(MAX_SHARDS_PER_KEYSPACE, MAX_KEYSPACES)
    }

    /// A cache with other bounds (tests exercise eviction with small ones). Both are at least 1.
    pub(crate) fn with_caps(shard_cap: usize, keyspace_cap: usize) -> Self {
        Self {
            keyspaces: RwLock::new(HashMap::new()),
            counters: Counters::default(),
            clock: AtomicU64::new(0),
            shard_cap: shard_cap.max(1),
            keyspace_cap: keyspace_cap.max(1),
        }
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn count(&self, event: Event) {
        let c = &self.counters;
        let counter = match event {
            Event::Hit => &c.hits,
            Event::Miss => &c.misses,
            Event::Fallback => &c.fallbacks,
            Event::Refresh => &c.refreshes,
            Event::RefreshFailure => &c.refresh_failures,
            Event::WrongShard => &c.wrong_shard,
            Event::AnsweredByTarget => &c.answered_by_target,
            Event::AnsweredElsewhere => &c.answered_elsewhere,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> RoutingStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RoutingStats {
            hits: get(&c.hits),
            misses: get(&c.misses),
            fallbacks: get(&c.fallbacks),
            refreshes: get(&c.refreshes),
            refresh_failures: get(&c.refresh_failures),
            wrong_shard: get(&c.wrong_shard),
            descriptor_updates: get(&c.descriptor_updates),
            leader_updates: get(&c.leader_updates),
            answered_by_target: get(&c.answered_by_target),
            answered_elsewhere: get(&c.answered_elsewhere),
            evictions: get(&c.evictions),
        }
    }

    /// Finds the shard of `key` in `keyspace`.
    pub(crate) fn lookup(&self, keyspace: &str, key: &RouteKey) -> Lookup {
        let map = self.keyspaces.read();
        let Some(slot) = map.get(keyspace) else {
            return Lookup::UnknownKeyspace;
        };
        let tick = self.tick();
        slot.last_used.store(tick, Ordering::Relaxed);
        let Some(routes) = slot.routes.as_ref().filter(|_| !slot.stale) else {
            return Lookup::UnknownKeyspace;
        };
        let Some(encoded) = key.encode(routes.keyspace_id, routes.hashed) else {
            return Lookup::Unroutable;
        };
        let refresh_due = slot.refresh_hint
            && slot
                .looked_up_at
                .is_none_or(|at| at.elapsed() >= HINTED_REFRESH_INTERVAL);
        match covering(&routes.shards, &encoded) {
            Some(entry) => {
                entry.last_used.store(tick, Ordering::Relaxed);
                let s = &entry.shard;
                Lookup::Hit {
                    key: encoded,
                    shard: ShardRoute {
                        id: s.id,
                        epoch: s.epoch,
                        leader: s.leader,
                        replicas: s.replicas.clone(),
                    },
                    refresh_due,
                }
            }
            None => Lookup::Miss { key: encoded },
        }
    }

    /// The state a lookup of `keyspace` starts from (see [`LookupTicket`]).
    pub(crate) fn ticket(&self, keyspace: &str) -> LookupTicket {
        let mut map = self.keyspaces.write();
        let slot = self.slot_mut(&mut map, keyspace);
        LookupTicket {
            lock: Arc::clone(&slot.lock),
            generation: slot.generation,
            allowed: slot.failed_at.is_none_or(|at| at.elapsed() >= LOOKUP_RETRY_AFTER),
        }
    }

    /// Completed lookups of `keyspace` so far.
    pub(crate) fn generation(&self, keyspace: &str) -> u64 {
        self.keyspaces.read().get(keyspace).map_or(0, |s| s.generation)
    }

    /// The slot of `keyspace`, created (evicting the least recently used beyond the bound) if
    /// absent.
    fn slot_mut<'m>(&self, map: &'m mut HashMap<String, KeyspaceSlot>, keyspace: &str) -> &'m mut KeyspaceSlot {
        if !map.contains_key(keyspace) {
            if map.len() >= self.keyspace_cap {
                let oldest = map
                    .iter()
                    .min_by_key(|(_, s)| s.last_used.load(Ordering::Relaxed))
                    .map(|(name, _)| name.clone());
                if let Some(name) = oldest {
                    map.remove(&name);
                    self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                }
            }
            map.insert(keyspace.to_owned(), KeyspaceSlot::new(self.tick()));
        }
        map.get_mut(keyspace)
            .expect("the slot was inserted above if it was missing")
    }

    /// Records a completed lookup of `keyspace`: its id and kind and all its shards. Routes of
    /// another incarnation are replaced; otherwise every descriptor is merged as by
    /// [`RoutingCache::merge`]. When there are more shards than the bound, the window around
    /// `focus` (the key that prompted the lookup) is kept.
    pub(crate) fn apply_listing(
        &self,
        keyspace: &str,
        keyspace_id: u32,
        hashed: bool,
        mut shards: Vec<ResolvedShard>,
        focus: Option<&RouteKey>,
    ) {
        shards.retain(|s| s.keyspace_id == keyspace_id && s.well_formed());
        shards.sort_by(|a, b| a.start.cmp(&b.start));
        if shards.len() > self.shard_cap {
            let at = focus.and_then(|k| k.encode(keyspace_id, hashed)).map_or(0, |k| {
                shards
                    .partition_point(|s| s.start.as_slice() <= k.as_slice())
                    .saturating_sub(1)
            });
            let first = at.saturating_sub(self.shard_cap / 2).min(shards.len() - self.shard_cap);
            shards = shards.drain(first..first + self.shard_cap).collect();
        }
        let mut map = self.keyspaces.write();
        let slot = self.slot_mut(&mut map, keyspace);
        let tick = self.tick();
        slot.last_used.store(tick, Ordering::Relaxed);
        let same = slot
            .routes
            .as_ref()
            .is_some_and(|r| r.keyspace_id == keyspace_id && r.hashed == hashed);
        if !same {
            slot.routes = Some(Routes {
                keyspace_id,
                hashed,
                shards: BTreeMap::new(),
            });
        }
        slot.stale = false;
        slot.failed_at = None;
        slot.refresh_hint = false;
        slot.looked_up_at = Some(Instant::now());
        slot.generation += 1;
        let routes = slot.routes.as_mut().expect("set just above when absent");
        for shard in shards {
            self.insert(routes, shard, tick);
        }
        self.count(Event::Refresh);
    }

    /// Records a failed lookup of `keyspace`: requests for it go by rotation for a while.
    pub(crate) fn lookup_failed(&self, keyspace: &str) {
        let mut map = self.keyspaces.write();
        let slot = self.slot_mut(&mut map, keyspace);
        slot.generation += 1;
        slot.failed_at = Some(Instant::now());
        self.count(Event::RefreshFailure);
    }

    /// Notes that an answer suggested the routes of `keyspace` are out of date (see the module
    /// invariants).
    pub(crate) fn hint_refresh(&self, keyspace: &str) {
        if let Some(slot) = self.keyspaces.write().get_mut(keyspace) {
            slot.refresh_hint = true;
        }
    }

    /// Offers one descriptor (from a `WrongShard` answer) to the cache of `keyspace`.
    pub(crate) fn merge(&self, keyspace: &str, shard: ResolvedShard) -> Merge {
        let mut map = self.keyspaces.write();
        let Some(slot) = map.get_mut(keyspace) else {
            return Merge::Refresh;
        };
        let Some(routes) = slot.routes.as_mut() else {
            return Merge::Refresh;
        };
        if routes.keyspace_id != shard.keyspace_id {
            slot.stale = true;
            return Merge::Refresh;
        }
        if !shard.well_formed() {
            return Merge::Ignored;
        }
        let tick = self.tick();
        if self.insert(routes, shard, tick) {
            self.counters.descriptor_updates.fetch_add(1, Ordering::Relaxed);
            Merge::Applied
        } else {
            Merge::Ignored
        }
    }

    /// Inserts `shard` under the epoch rule of the module invariants; returns whether it was
    /// admitted. Evicts the least recently used other shard beyond the bound.
    fn insert(&self, routes: &mut Routes, mut shard: ResolvedShard, tick: u64) -> bool {
        let overlapping = overlapping(&routes.shards, &shard.start, &shard.end);
        if overlapping
            .iter()
            .any(|start| routes.shards[start].shard.epoch > shard.epoch)
        {
            return false;
        }
        for start in overlapping {
            let old = routes
                .shards
                .remove(&start)
                .expect("overlapping() returns keys present in the map");
            // A node that holds no replica of the shard describes it without a leader; keep the
            // one learned earlier if it is still a replica.
            if shard.leader.is_none() && old.shard.id == shard.id {
                shard.leader = old
                    .shard
                    .leader
                    .filter(|l| shard.replicas.iter().any(|r| r.node_id == l.node_id));
            }
        }
        let start = shard.start.clone();
        routes.shards.insert(
            start.clone(),
            Entry {
                shard,
                last_used: AtomicU64::new(tick),
            },
        );
        while routes.shards.len() > self.shard_cap {
            let victim = routes
                .shards
                .iter()
                .filter(|(s, _)| **s != start)
                .min_by_key(|(_, e)| e.last_used.load(Ordering::Relaxed))
                .map(|(s, _)| s.clone());
            let Some(victim) = victim else { break };
            routes.shards.remove(&victim);
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// Records that `leader` leads shard `shard_id`, the cached shard covering `key`. Returns
    /// whether anything changed. Nothing is recorded when the cache has since moved on to
    /// another shard for the key.
    pub(crate) fn set_leader(&self, keyspace: &str, key: &[u8], shard_id: u64, leader: NodeRoute) -> bool {
        self.with_entry(keyspace, key, shard_id, |shard| {
            if shard.leader == Some(leader) {
                return false;
            }
            shard.leader = Some(leader);
            true
        })
        .inspect(|changed| {
            if *changed {
                self.counters.leader_updates.fetch_add(1, Ordering::Relaxed);
            }
        })
        .unwrap_or(false)
    }

    /// Forgets the leader of shard `shard_id` (covering `key`) if it is still `node_id`, or
    /// whatever it is when `node_id` is `None` (an election is under way).
    pub(crate) fn clear_leader(&self, keyspace: &str, key: &[u8], shard_id: u64, node_id: Option<u64>) {
        self.with_entry(keyspace, key, shard_id, |shard| {
            if node_id.is_none() || shard.leader.map(|l| l.node_id) == node_id {
                shard.leader = None;
            }
        });
    }

    /// Drops the cached shard covering `key`, so the next request for it refreshes.
    pub(crate) fn invalidate(&self, keyspace: &str, key: &[u8]) {
        let mut map = self.keyspaces.write();
        let Some(routes) = map.get_mut(keyspace).and_then(|s| s.routes.as_mut()) else {
            return;
        };
        let start = covering(&routes.shards, key).map(|e| e.shard.start.clone());
        if let Some(start) = start {
            routes.shards.remove(&start);
        }
    }

    /// Forgets the routes of `keyspace` (it does not exist, or no longer): its next use looks it
    /// up again, still subject to the pause after a failed lookup.
    pub(crate) fn forget(&self, keyspace: &str) {
        if let Some(slot) = self.keyspaces.write().get_mut(keyspace) {
            slot.routes = None;
            slot.stale = false;
        }
    }

    /// The cached shards of `keyspace` in key order; `None` when its routes are not cached.
    pub(crate) fn snapshot(&self, keyspace: &str) -> Option<Vec<CachedShard>> {
        let map = self.keyspaces.read();
        let routes = map.get(keyspace)?.routes.as_ref()?;
        Some(
            routes
                .shards
                .values()
                .map(|e| CachedShard {
                    id: e.shard.id,
                    start: Bytes::copy_from_slice(&e.shard.start),
                    end: Bytes::copy_from_slice(&e.shard.end),
                    epoch: e.shard.epoch,
                    replicas: e.shard.replicas.iter().map(|r| r.node_id).collect(),
                    leader_id: e.shard.leader.map(|l| l.node_id),
                })
                .collect(),
        )
    }

    fn with_entry<T>(
        &self,
        keyspace: &str,
        key: &[u8],
        shard_id: u64,
        f: impl FnOnce(&mut ResolvedShard) -> T,
    ) -> Option<T> {
        let mut map = self.keyspaces.write();
        let routes = map.get_mut(keyspace)?.routes.as_mut()?;
        let start = covering(&routes.shards, key)?.shard.start.clone();
        let entry = routes.shards.get_mut(&start)?;
        (entry.shard.id == shard_id).then(|| f(&mut entry.shard))
    }
}

/// The entry whose range holds `key`.
fn covering<'a>(shards: &'a BTreeMap<Vec<u8>, Entry>, key: &[u8]) -> Option<&'a Entry> {
    shards
        .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
        .next_back()
        .map(|(_, e)| e)
        .filter(|e| e.shard.contains(key))
}

/// The start keys of the entries that overlap `[start, end)` (empty `end`: unbounded). Entries
/// never overlap one another, so their ends ascend with their starts: walking back from the last
/// entry starting below `end`, the overlapping ones are those until the first that ends at or
/// before `start`.
fn overlapping(shards: &BTreeMap<Vec<u8>, Entry>, start: &[u8], end: &[u8]) -> Vec<Vec<u8>> {
    let upper = if end.is_empty() {
        Bound::Unbounded
    } else {
        Bound::Excluded(end)
    };
    shards
        .range::<[u8], _>((Bound::Unbounded, upper))
        .rev()
        .take_while(|(_, e)| e.shard.end.is_empty() || e.shard.end.as_slice() > start)
        .map(|(s, _)| s.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KS: &str = "orders";
    const ID: u32 = 7;

    fn node(node_id: u64) -> NodeRoute {
        NodeRoute {
            node_id,
            slot: Some(node_id as usize),
        }
    }

    /// A range shard of keyspace `ID` from user key `start` to `end` ("" = the keyspace's
    /// edge), on nodes 1..=3.
    fn shard(id: u64, start: &str, end: &str, epoch: u64) -> ResolvedShard {
        let (ks_start, ks_end) = keycodec::keyspace_range(ID);
        ResolvedShard {
            id,
            keyspace_id: ID,
            start: if start.is_empty() {
                ks_start
            } else {
                keycodec::encode_key(ID, false, start.as_bytes())
            },
            end: if end.is_empty() {
                ks_end
            } else {
                keycodec::encode_key(ID, false, end.as_bytes())
            },
            epoch,
            replicas: vec![node(1), node(2), node(3)],
            leader: None,
        }
    }

    fn user(key: &str) -> RouteKey {
        RouteKey::User(Bytes::copy_from_slice(key.as_bytes()))
    }

    fn shard_of(cache: &RoutingCache, key: &str) -> Option<u64> {
        match cache.lookup(KS, &user(key)) {
            Lookup::Hit { shard, .. } => Some(shard.id),
            _ => None,
        }
    }

    fn filled(shards: Vec<ResolvedShard>) -> RoutingCache {
        let cache = RoutingCache::new();
        cache.apply_listing(KS, ID, false, shards, None);
        cache
    }

    #[test]
    fn lookup_finds_the_shard_of_a_key() {
        let cache = RoutingCache::new();
        assert_eq!(cache.lookup(KS, &user("a")), Lookup::UnknownKeyspace);
        cache.apply_listing(
            KS,
            ID,
            false,
            vec![shard(3, "m", "", 2), shard(1, "", "f", 2), shard(2, "f", "m", 2)],
            None,
        );
        assert_eq!(shard_of(&cache, ""), Some(1));
        assert_eq!(shard_of(&cache, "a"), Some(1));
        assert_eq!(shard_of(&cache, "f"), Some(2), "start bounds are inclusive");
        assert_eq!(shard_of(&cache, "l\u{ff}"), Some(2));
        assert_eq!(shard_of(&cache, "m"), Some(3), "end bounds are exclusive");
        assert_eq!(shard_of(&cache, "zzz"), Some(3));
        let stats = cache.stats();
        assert_eq!((stats.refreshes, stats.evictions), (1, 0));
    }

    #[test]
    fn an_empty_end_is_the_end_of_the_keyspace() {
        let mut last = shard(1, "", "", 1);
        last.end = Vec::new();
        let cache = filled(vec![last]);
        assert_eq!(shard_of(&cache, "anything"), Some(1));
    }

    #[test]
    fn hash_keys_are_placed_by_their_hash() {
        let bounds = keycodec::hash_shard_bounds(ID, 4);
        let shards = bounds
            .windows(2)
            .enumerate()
            .map(|(i, w)| ResolvedShard {
                id: 100 + i as u64,
                keyspace_id: ID,
                start: w[0].clone(),
                end: w[1].clone(),
                epoch: 1,
                replicas: vec![node(1)],
                leader: None,
            })
            .collect();
        let cache = RoutingCache::new();
        cache.apply_listing(KS, ID, true, shards, None);
        for key in ["a", "b", "user42", ""] {
            let quarter = u64::from(keycodec::hash_of(key.as_bytes()) >> 14);
            assert_eq!(shard_of(&cache, key), Some(100 + quarter), "{key}");
        }
        // A scan with no cursor starts at the first hash value, whatever its start key.
        let scan = RouteKey::Scan {
            cursor: Bytes::new(),
            start: Bytes::from_static(b"zzz"),
        };
        assert!(matches!(cache.lookup(KS, &scan), Lookup::Hit { shard, .. } if shard.id == 100));
    }

    #[test]
    fn scans_are_routed_by_their_cursor() {
        let cache = filled(vec![shard(1, "", "m", 1), shard(2, "m", "", 1)]);
        let at = |cursor: &[u8], start: &str| RouteKey::Scan {
            cursor: Bytes::copy_from_slice(cursor),
            start: Bytes::copy_from_slice(start.as_bytes()),
        };
        let hit = |k: RouteKey| match cache.lookup(KS, &k) {
            Lookup::Hit { shard, .. } => Some(shard.id),
            _ => None,
        };
        assert_eq!(hit(at(b"", "a")), Some(1));
        assert_eq!(hit(at(b"", "q")), Some(2));
        let cursor = keycodec::encode_key(ID, false, b"n");
        assert_eq!(hit(at(&cursor, "a")), Some(2));
        // A cursor of another keyspace cannot be placed here.
        let foreign = keycodec::encode_key(ID + 1, false, b"n");
        assert_eq!(cache.lookup(KS, &at(&foreign, "a")), Lookup::Unroutable);
    }

    #[test]
    fn a_newer_descriptor_replaces_what_it_overlaps() {
        let cache = filled(vec![shard(1, "", "m", 1), shard(2, "m", "", 1)]);
        // Shard 1 split at "f": the right half arrives in a WrongShard answer.
        assert_eq!(cache.merge(KS, shard(5, "f", "m", 2)), Merge::Applied);
        assert_eq!(shard_of(&cache, "g"), Some(5));
        assert_eq!(
            shard_of(&cache, "a"),
            None,
            "the stale parent is gone: a miss, not a wrong hit"
        );
        assert!(matches!(cache.lookup(KS, &user("a")), Lookup::Miss { .. }));
        assert_eq!(shard_of(&cache, "n"), Some(2));
        // The left half, learned later.
        assert_eq!(cache.merge(KS, shard(1, "", "f", 2)), Merge::Applied);
        assert_eq!(shard_of(&cache, "a"), Some(1));
        assert_eq!(cache.stats().descriptor_updates, 2);
    }

    #[test]
    fn an_older_descriptor_is_ignored() {
        let cache = filled(vec![shard(1, "", "f", 2), shard(5, "f", "m", 2), shard(2, "m", "", 1)]);
        // A node that has not seen the split describes the parent.
        assert_eq!(cache.merge(KS, shard(1, "", "m", 1)), Merge::Ignored);
        assert_eq!(shard_of(&cache, "g"), Some(5));
        assert_eq!(shard_of(&cache, "a"), Some(1));
        // A listing from such a node does not undo the split either.
        cache.apply_listing(KS, ID, false, vec![shard(1, "", "m", 1), shard(2, "m", "", 1)], None);
        assert_eq!(shard_of(&cache, "g"), Some(5));
        assert_eq!(shard_of(&cache, "n"), Some(2));
    }

    #[test]
    fn a_merge_replaces_both_halves() {
        let cache = filled(vec![shard(1, "", "f", 2), shard(5, "f", "m", 2), shard(2, "m", "", 1)]);
        assert_eq!(cache.merge(KS, shard(1, "", "m", 3)), Merge::Applied);
        assert_eq!(shard_of(&cache, "g"), Some(1));
        assert_eq!(cache.snapshot(KS).map(|s| s.len()), Some(2));
    }

    #[test]
    fn leaders_are_recorded_per_shard_and_survive_a_leaderless_redescription() {
        let cache = filled(vec![shard(1, "", "m", 1), shard(2, "m", "", 1)]);
        let key = keycodec::encode_key(ID, false, b"a");
        assert!(cache.set_leader(KS, &key, 1, node(2)));
        assert!(!cache.set_leader(KS, &key, 1, node(2)), "no change");
        // The key's shard is 1, not 9: a hint for a shard the cache no longer has is dropped.
        assert!(!cache.set_leader(KS, &key, 9, node(3)));
        assert!(matches!(cache.lookup(KS, &user("a")), Lookup::Hit { shard, .. } if shard.leader == Some(node(2))));
        // The same shard described by a node without a replica (no leader known there).
        assert_eq!(cache.merge(KS, shard(1, "", "m", 1)), Merge::Applied);
        assert!(matches!(cache.lookup(KS, &user("a")), Lookup::Hit { shard, .. } if shard.leader == Some(node(2))));
        cache.clear_leader(KS, &key, 1, Some(3));
        assert!(matches!(cache.lookup(KS, &user("a")), Lookup::Hit { shard, .. } if shard.leader.is_some()));
        cache.clear_leader(KS, &key, 1, Some(2));
        assert!(matches!(cache.lookup(KS, &user("a")), Lookup::Hit { shard, .. } if shard.leader.is_none()));
        assert_eq!(cache.stats().leader_updates, 1);
    }

    #[test]
    fn another_incarnation_of_the_keyspace_forces_a_refresh() {
        let cache = filled(vec![shard(1, "", "", 1)]);
        let mut foreign = shard(9, "", "", 1);
        foreign.keyspace_id = ID + 1;
        assert_eq!(cache.merge(KS, foreign), Merge::Refresh);
        assert_eq!(cache.lookup(KS, &user("a")), Lookup::UnknownKeyspace);
        // The refresh brings the new id; the old routes are gone.
        let mut new = shard(9, "", "", 1);
        new.keyspace_id = ID + 1;
        let (s, e) = keycodec::keyspace_range(ID + 1);
        new.start = s;
        new.end = e;
        cache.apply_listing(KS, ID + 1, false, vec![new], None);
        assert_eq!(shard_of(&cache, "a"), Some(9));
        assert_eq!(cache.snapshot(KS).map(|s| s.len()), Some(1));
    }

    #[tokio::test]
    async fn forwarded_answers_prompt_a_lookup_at_most_once_per_interval() {
        let cache = filled(vec![shard(1, "", "", 1)]);
        let due = |cache: &RoutingCache| match cache.lookup(KS, &user("a")) {
            Lookup::Hit { refresh_due, .. } => refresh_due,
            other => panic!("expected a hit, got {other:?}"),
        };
        assert!(!due(&cache));
        cache.hint_refresh(KS);
        assert!(!due(&cache), "looked up less than an interval ago");
        // As if the last lookup were an interval old.
        cache.keyspaces.write().get_mut(KS).expect("cached").looked_up_at =
            Some(Instant::now() - HINTED_REFRESH_INTERVAL);
        assert!(due(&cache));
        cache.apply_listing(KS, ID, false, vec![shard(1, "", "", 1)], None);
        assert!(!due(&cache), "a lookup answers the hint");
    }

    #[test]
    fn invalidate_and_forget() {
        let cache = filled(vec![shard(1, "", "m", 1), shard(2, "m", "", 1)]);
        cache.invalidate(KS, &keycodec::encode_key(ID, false, b"a"));
        assert!(matches!(cache.lookup(KS, &user("a")), Lookup::Miss { .. }));
        assert_eq!(shard_of(&cache, "x"), Some(2));
        cache.forget(KS);
        assert_eq!(cache.lookup(KS, &user("x")), Lookup::UnknownKeyspace);
        assert_eq!(cache.merge(KS, shard(1, "", "m", 1)), Merge::Refresh);
    }

    #[tokio::test]
    async fn failed_lookups_are_not_repeated_at_once() {
        let cache = RoutingCache::new();
        let t = cache.ticket(KS);
        assert!(t.allowed);
        assert_eq!(t.generation, 0);
        cache.lookup_failed(KS);
        let t = cache.ticket(KS);
        assert!(!t.allowed);
        assert_eq!(t.generation, 1);
        assert_eq!(cache.stats().refresh_failures, 1);
        cache.apply_listing(KS, ID, false, vec![shard(1, "", "", 1)], None);
        assert!(cache.ticket(KS).allowed);
        assert_eq!(cache.generation(KS), 2);
    }

    #[test]
    fn shards_are_bounded_per_keyspace_least_recently_used_first() {
        let cache = RoutingCache::with_caps(3, 8);
        let keys = ["", "d", "h", "m", "q", "u"];
        let shards: Vec<ResolvedShard> = keys
            .iter()
            .enumerate()
            .map(|(i, s)| shard(i as u64, s, keys.get(i + 1).copied().unwrap_or(""), 1))
            .collect();
        // A listing larger than the bound keeps the window around the key that prompted it.
        cache.apply_listing(KS, ID, false, shards.clone(), Some(&user("n")));
        let ids: Vec<u64> = cache.snapshot(KS).expect("cached").iter().map(|s| s.id).collect();
        assert_eq!(ids, [2, 3, 4]);
        // Use 2 and 4, then learn 0: 3 was used least recently.
        assert_eq!(shard_of(&cache, "i"), Some(2));
        assert_eq!(shard_of(&cache, "r"), Some(4));
        assert_eq!(cache.merge(KS, shards[0].clone()), Merge::Applied);
        let ids: Vec<u64> = cache.snapshot(KS).expect("cached").iter().map(|s| s.id).collect();
        assert_eq!(ids, [0, 2, 4]);
        assert_eq!(cache.stats().evictions, 1);
    }

    #[test]
    fn keyspaces_are_bounded() {
        let cache = RoutingCache::with_caps(8, 2);
        cache.apply_listing("a", ID, false, vec![shard(1, "", "", 1)], None);
        cache.apply_listing("b", ID, false, vec![shard(1, "", "", 1)], None);
        let _ = cache.lookup("a", &user("k"));
        cache.apply_listing("c", ID, false, vec![shard(1, "", "", 1)], None);
        assert!(cache.snapshot("a").is_some());
        assert!(cache.snapshot("b").is_none(), "least recently used");
        assert!(cache.snapshot("c").is_some());
    }

    /// One update: a descriptor over `[lo, hi)` of a small key universe with an epoch. Small
    /// universes make overlaps and equal epochs frequent.
    fn descriptors() -> impl Strategy<Value = Vec<(u8, u8, u64, u64)>> {
        prop::collection::vec((0u8..12, 1u8..12, 1u64..6, 0u64..20), 1..40)
    }

    fn bound(i: u8) -> Vec<u8> {
        if i == 0 {
            keycodec::keyspace_range(ID).0
        } else if i >= 12 {
            keycodec::keyspace_range(ID).1
        } else {
            keycodec::encode_key(ID, false, &[b'a' + i])
        }
    }

    proptest! {
        #[test]
        fn updates_never_leave_overlaps_and_admit_only_the_newest(updates in descriptors()) {
            let cache = RoutingCache::with_caps(6, 4);
            cache.apply_listing(KS, ID, false, vec![], None);
            for (lo, len, epoch, id) in updates {
                let hi = lo.saturating_add(len).min(12);
                let d = ResolvedShard {
                    id,
                    keyspace_id: ID,
                    start: bound(lo),
                    end: bound(hi),
                    epoch,
                    replicas: vec![node(1)],
                    leader: None,
                };
                let before = cache.snapshot(KS).expect("listed");
                let newest_overlapped = before
                    .iter()
                    .filter(|s| s.start.as_ref() < d.end.as_slice() && d.start.as_slice() < s.end.as_ref())
                    .map(|s| s.epoch)
                    .max();
                let outcome = cache.merge(KS, d.clone());
                let admitted = newest_overlapped.is_none_or(|e| e <= epoch);
                prop_assert_eq!(outcome == Merge::Applied, admitted);
                let after = cache.snapshot(KS).expect("listed");
                prop_assert!(after.len() <= 6);
                for w in after.windows(2) {
                    prop_assert!(w[0].end.as_ref() <= w[1].start.as_ref(), "overlap: {:?}", w);
                }
                for s in &after {
                    prop_assert!(s.start < s.end);
                }
                // Every key of an admitted descriptor now finds it; every cached key finds the
                // shard whose range holds it.
                for k in 0u8..12 {
                    let key = RouteKey::User(Bytes::copy_from_slice(&[b'a' + k]));
                    let encoded = keycodec::encode_key(ID, false, &[b'a' + k]);
                    let holder = after.iter().find(|s| s.start.as_ref() <= encoded.as_slice() && encoded.as_slice() < s.end.as_ref());
                    match cache.lookup(KS, &key) {
                        Lookup::Hit { shard, .. } => prop_assert_eq!(Some(shard.id), holder.map(|h| h.id)),
                        Lookup::Miss { .. } => prop_assert!(holder.is_none()),
                        other => prop_assert!(false, "unexpected {:?}", other),
                    }
                    if admitted && d.contains(&encoded) {
                        prop_assert_eq!(holder.map(|h| h.id), Some(d.id));
                    }
                }
            }
        }
    }
}
