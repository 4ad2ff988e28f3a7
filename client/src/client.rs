//! [`Client`]: the public Rust API of Basalt (key-value operations and cluster administration).
//!
//! A `Client` is a cheap handle (`Arc` inside) meant to be cloned into many tasks; all clones share
//! one routing cache, one set of channels and one write session. A client targets one keyspace
//! ([`DEFAULT_KEYSPACE`] unless [`Client::with_keyspace`] says otherwise); handles for other
//! keyspaces are clones too, so one session numbers the writes to all of them.
//!
//! Invariants:
//! - Every write (`put`, `delete`, `compare_and_swap`) takes exactly one session sequence number
//!   before its first attempt and sends that number on every retry, so the server applies it at
//!   most once; the number is released when the call returns or is dropped (see `session`).
//! - Reads and admin calls carry no session (the protocol has none for them). Reads are
//!   idempotent. An admin call whose earlier attempt was applied but unanswered is retried like
//!   any other, so the retry may report the server's verdict on the repeated change (for example
//!   that the member already exists) rather than the original success.
//! - Every key-value request names the handle's keyspace explicitly, never the empty string, so
//!   that what a request targets does not depend on a server-side default.
//! - Every call is bounded by the configured deadline; no call waits forever. A scan that follows
//!   its cursor through several shards is one call: all its requests share one deadline.
//! - A scan never returns a pair twice or skips one, however the range is split into shards:
//!   each request continues from the cursor of the previous response, and a response that could
//!   make no progress (no pairs, and a cursor that goes nowhere) is reported as a protocol
//!   violation instead of being asked again forever.

use std::fmt;
use std::sync::Arc;

use basalt_proto::v1::admin_client::AdminClient;
use basalt_proto::v1::compare_and_swap_request::Expected;
use basalt_proto::v1::kv_client::KvClient;
use basalt_proto::v1::{
    AddMemberRequest, ClusterStatusRequest, ClusterStatusResponse, CompareAndSwapRequest, CreateKeyspaceRequest,
    DeleteRequest, DescribeKeyspaceRequest, DropKeyspaceRequest, GetRequest, Keyspace, ListKeyspacesRequest,
    ListShardsRequest, MergeShardRequest, MoveShardRequest, PlacementStatusRequest, PlacementStatusResponse,
    PutRequest, RemoveMemberRequest, ScanRequest, ScanResponse, Shard, Sharding as WireSharding, SplitShardRequest,
    TransferLeaderRequest, TransferShardLeaderRequest,
};
use basalt_proto::Dialer;
use bytes::Bytes;
use tonic::Code;
use tracing::Instrument;

use crate::config::ClientConfig;
use crate::error::ClientError;
use crate::read_mode::{older, ReadMode, ServedRead};
use crate::retry::{call, call_routed, Deadline, HasHeader};
use crate::route::KeyRoute;
use crate::router::Router;
use crate::routing::{CachedShard, RouteKey, RoutingCache, RoutingStats};
use crate::session::SessionTracker;

/// What a compare-and-swap compares the key's current state with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The key must currently hold exactly this value.
    Value(Bytes),
    /// The key must not exist.
    Absent,
}

/// The result of a compare-and-swap that reached the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CasOutcome {
    /// Whether the new value was written.
    pub succeeded: bool,
    /// The value the key held when the comparison was made; `None` if it did not exist.
    pub current: Option<Bytes>,
}

/// The keyspace a [`Client`] targets unless [`Client::with_keyspace`] names another; it always
/// exists.
pub const DEFAULT_KEYSPACE: &str = "default";

/// One page of a scan.
///
/// Order: in a range-sharded keyspace (such as [`DEFAULT_KEYSPACE`]) pairs come in ascending key
/// order. In a hash-sharded keyspace they come in hash order (ascending key order only within
/// one hash value), and a range scan reads every shard; use `get` for point lookups there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanPage {
    /// The pairs, in the keyspace's order (see above).
    pub kvs: Vec<(Bytes, Bytes)>,
    /// True when more pairs may follow (it can be true with nothing left, when the page ended
    /// exactly at the end of a shard). To continue, pass [`ScanPage::cursor`] to
    /// [`Client::scan_from_cursor`] with the same start and end. In a range-sharded keyspace a new
    /// scan from the last key's successor (the last key followed by a zero byte) continues the
    /// same way; in a hash-sharded one only the cursor does.
    pub more: bool,
    /// Where the scan continues, when `more` is true; opaque. `None` when `more` is false, or
    /// when the server predates cursors (it then holds one range-sharded keyspace, and the scan
    /// continues from the last key's successor).
    pub cursor: Option<Bytes>,
    /// How the scan's pages were served: of a multi-page scan, the page that may be the oldest
    /// (the largest staleness bound), else the last. `None` from a server that predates read
    /// modes.
    pub served: Option<ServedRead>,
}

/// A value read, and how the read was served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Read {
    /// The value; `None` if the key does not exist.
    pub value: Option<Bytes>,
    /// `None` from a server that predates read modes.
    pub served: Option<ServedRead>,
}

/// How a keyspace's keys are divided into shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sharding {
    /// Shards are ranges of user keys, in key order: range scans read only the shards the range
    /// covers, and return keys in order.
    Range,
    /// Shards are ranges of a 16-bit hash of the key: writes spread evenly, but a range scan
    /// reads every shard and returns keys in hash order.
    Hash,
}

impl Sharding {
    /// The sharding a protobuf `Keyspace::sharding` value names; `None` for unspecified or
    /// unknown values (from a newer server).
    pub fn from_wire(value: i32) -> Option<Sharding> {
        match WireSharding::try_from(value) {
            Ok(WireSharding::Range) => Some(Sharding::Range),
            Ok(WireSharding::Hash) => Some(Sharding::Hash),
            Ok(WireSharding::Unspecified) | Err(_) => None,
        }
    }

    /// The protobuf value for this sharding.
    pub fn to_wire(self) -> i32 {
        match self {
            Sharding::Range => WireSharding::Range as i32,
            Sharding::Hash => WireSharding::Hash as i32,
        }
    }

    /// `"range"` or `"hash"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Sharding::Range => "range",
            Sharding::Hash => "hash",
        }
    }
}

impl fmt::Display for Sharding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A keyspace and its shards, as [`Client::describe_keyspace`] returns them.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyspaceDescription {
    pub keyspace: Keyspace,
    pub shards: Vec<Shard>,
}

/// The two shards a [`Client::split_shard`] produced.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardSplit {
    /// The lower half; it keeps the split shard's id.
    pub left: Shard,
    pub right: Shard,
}

/// What a [`Client::merge_shard`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardMerge {
    /// The merged shard: the left shard's id over both ranges, at a new epoch.
    pub shard: Shard,
    /// The id of the right neighbour it absorbed.
    pub absorbed: u64,
}

/// A handle to a Basalt cluster. Cheap to clone; clones share routing state and the write session.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    /// The keyspace every key-value request names; never empty.
    keyspace: Arc<str>,
    /// This handle's read mode; `KeyspaceDefault` defers to the client's configured default.
    read_mode: ReadMode,
}

struct Inner {
    cfg: ClientConfig,
    router: Router,
    /// Shard routes per keyspace, shared by every keyspace handle (see `routing`).
    cache: RoutingCache,
    session: SessionTracker,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("client_id", &self.inner.session.client_id())
            .field("keyspace", &self.keyspace)
            .field("endpoints", &self.inner.router.endpoints())
            .field("leader_hint", &self.inner.router.leader_id())
            .finish()
    }
}

impl Client {
    /// Validates `cfg` and prepares one lazily connected channel per endpoint. No connection is
    /// made here, so this succeeds while the cluster is down; the first call connects. Must be
    /// called inside a tokio runtime.
    pub async fn connect(cfg: ClientConfig) -> Result<Client, ClientError> {
        Self::connect_with(cfg, Dialer::Tcp).await
    }

    /// As [`Client::connect`], opening connections through `dialer` (the simulator's network,
    /// for one) instead of TCP.
    pub async fn connect_with(cfg: ClientConfig, dialer: Dialer) -> Result<Client, ClientError> {
        let seeds = cfg.validate()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ClientError::Config(
                "Client::connect must run inside a tokio runtime".into(),
            ));
        }
        let router = Router::new(seeds, cfg.attempt_timeout, dialer);
        let session = SessionTracker::new();
        tracing::debug!(client_id = session.client_id(), endpoints = ?router.endpoints(), "client created");
        Ok(Client {
            inner: Arc::new(Inner {
                cfg,
                router,
                cache: RoutingCache::new(),
                session,
            }),
            keyspace: Arc::from(DEFAULT_KEYSPACE),
            read_mode: ReadMode::KeyspaceDefault,
        })
    }

    /// A handle for keyspace `name` that shares this client's channels, routing cache and write
    /// session (so it is as cheap as a clone). An empty name means [`DEFAULT_KEYSPACE`], as on the
    /// wire. Whether the keyspace exists is checked by the server, on the first request.
    pub fn with_keyspace(&self, name: impl Into<String>) -> Client {
        let name = name.into();
        let keyspace = if name.is_empty() {
            Arc::from(DEFAULT_KEYSPACE)
        } else {
            Arc::from(name)
        };
        Client {
            inner: Arc::clone(&self.inner),
            keyspace,
            read_mode: self.read_mode,
        }
    }

    /// A handle whose reads (`get`, `scan`) use `mode`, sharing everything else with this one.
    /// [`ReadMode::KeyspaceDefault`] goes back to the client's configured default.
    pub fn with_read_mode(&self, mode: ReadMode) -> Client {
        Client {
            inner: Arc::clone(&self.inner),
            keyspace: Arc::clone(&self.keyspace),
            read_mode: mode,
        }
    }

    /// The read mode this handle's reads ask for: its own, else the client's default.
    pub fn read_mode(&self) -> ReadMode {
        match self.read_mode {
            ReadMode::KeyspaceDefault => self.inner.cfg.read_mode,
            m => m,
        }
    }

    /// The keyspace this handle's key-value requests target.
    pub fn keyspace(&self) -> &str {
        &self.keyspace
    }

    /// Writes `value` under `key`, exactly once.
    pub async fn put(&self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Result<(), ClientError> {
        let (key, value) = (key.into(), value.into());
        let ticket = self.inner.session.begin();
        let keyspace = self.keyspace();
        let span = tracing::debug_span!(
            "basalt.put",
            keyspace,
            key_len = key.len(),
            value_len = value.len(),
            seq = ticket.sequence()
        );
        self.call_key(
            "put",
            RouteKey::User(key.clone()),
            Deadline::after(self.inner.cfg.deadline),
            || PutRequest {
                keyspace: keyspace.to_owned(),
                key: key.clone(),
                value: value.clone(),
                session: Some(ticket.session()),
            },
            |ch, req| async move { KvClient::new(ch).put(req).await },
        )
        .instrument(span)
        .await
        .map(|_| ())
    }

    /// The value under `key`, or `None` if it does not exist. Linearizable.
    pub async fn get(&self, key: impl Into<Bytes>) -> Result<Option<Bytes>, ClientError> {
        self.read(key).await.map(|r| r.value)
    }

    /// As [`Client::get`], also saying how the read was served (mode, replica, applied index and,
    /// for the stale modes, how old the answer may be).
    pub async fn read(&self, key: impl Into<Bytes>) -> Result<Read, ClientError> {
        let key = key.into();
        let keyspace = self.keyspace();
        let mode = self.read_mode();
        let span = tracing::debug_span!("basalt.get", keyspace, key_len = key.len(), %mode);
        self.call_key_in(
            "get",
            RouteKey::User(key.clone()),
            Deadline::after(self.inner.cfg.deadline),
            mode.any_replica(),
            || GetRequest {
                keyspace: keyspace.to_owned(),
                key: key.clone(),
                read: mode.to_pb(),
            },
            |ch, req| async move { KvClient::new(ch).get(req).await },
        )
        .instrument(span)
        .await
        .map(|resp| Read {
            value: resp.value,
            served: resp.read.as_ref().map(ServedRead::from_pb),
        })
    }

    /// Deletes `key`, exactly once. Returns whether it existed.
    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<bool, ClientError> {
        let key = key.into();
        let ticket = self.inner.session.begin();
        let keyspace = self.keyspace();
        let span = tracing::debug_span!("basalt.delete", keyspace, key_len = key.len(), seq = ticket.sequence());
        self.call_key(
            "delete",
            RouteKey::User(key.clone()),
            Deadline::after(self.inner.cfg.deadline),
            || DeleteRequest {
                keyspace: keyspace.to_owned(),
                key: key.clone(),
                session: Some(ticket.session()),
            },
            |ch, req| async move { KvClient::new(ch).delete(req).await },
        )
        .instrument(span)
        .await
        .map(|resp| resp.existed)
    }

    /// Up to `limit` pairs in `[start, end)`; `end: None` is unbounded. Linearizable per shard.
    ///
    /// The server answers one shard at a time; this follows its cursor from shard to shard (over
    /// shards with nothing in the range) until it has `limit` pairs or the range is exhausted.
    /// `limit` 0 asks for one server page: the pairs of the first response that has any, at most
    /// the server's maximum page size. The pairs come in the keyspace's order (see [`ScanPage`]);
    /// continue with [`Client::scan_from_cursor`] while [`ScanPage::more`] is set.
    ///
    /// `Some(end)` below `start` is rejected; `Some(end) == start` is an empty range and returns
    /// an empty page without asking the server (on the wire an empty `end` means "unbounded", so
    /// `Some(b"")` could not be sent faithfully).
    pub async fn scan(&self, start: impl Into<Bytes>, end: Option<Bytes>, limit: u32) -> Result<ScanPage, ClientError> {
        self.scan_from_cursor(start, end, limit, None).await
    }

    /// As [`Client::scan`], continuing a scan of the same `[start, end)` from `cursor` (a previous
    /// page's [`ScanPage::cursor`]); `None` starts at the beginning of the range.
    pub async fn scan_from_cursor(
        &self,
        start: impl Into<Bytes>,
        end: Option<Bytes>,
        limit: u32,
        cursor: Option<Bytes>,
    ) -> Result<ScanPage, ClientError> {
        let start = start.into();
        if let Some(end) = &end {
            if *end < start {
                return Err(ClientError::InvalidArgument {
                    field: "end".into(),
                    reason: "the end of a scan must not be below its start".into(),
                });
            }
            if *end == start {
                return Ok(ScanPage::default());
            }
        }
        let end = end.unwrap_or_default();
        let keyspace = self.keyspace();
        let span = tracing::debug_span!(
            "basalt.scan",
            keyspace,
            start_len = start.len(),
            end_len = end.len(),
            limit
        );
        let mode = self.read_mode();
        let mut scan = ScanState {
            start,
            end,
            limit,
            cursor: cursor.unwrap_or_default(),
            kvs: Vec::new(),
            mode,
            served: None,
        };
        let deadline = Deadline::after(self.inner.cfg.deadline);
        async {
            loop {
                let request = scan.request(keyspace);
                // Each page goes to the shard holding the scan's position: its cursor, else the
                // range's first position (see `RouteKey::Scan`).
                let position = RouteKey::Scan {
                    cursor: request.cursor.clone(),
                    start: request.start.clone(),
                };
                let response = self
                    .call_key_in(
                        "scan",
                        position,
                        deadline,
                        mode.any_replica(),
                        || request.clone(),
                        |ch, req| async move { KvClient::new(ch).scan(req).await },
                    )
                    .await?;
                if let Some(page) = scan.absorb(response)? {
                    return Ok(page);
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Writes `new_value` under `key` if the key's current state matches `expected`, exactly once.
    pub async fn compare_and_swap(
        &self,
        key: impl Into<Bytes>,
        expected: Expect,
        new_value: impl Into<Bytes>,
    ) -> Result<CasOutcome, ClientError> {
        let (key, new_value) = (key.into(), new_value.into());
        let expected = match expected {
            Expect::Value(v) => Expected::ExpectedValue(v),
            Expect::Absent => Expected::ExpectAbsent(true),
        };
        let ticket = self.inner.session.begin();
        let keyspace = self.keyspace();
        let span = tracing::debug_span!(
            "basalt.compare_and_swap",
            keyspace,
            key_len = key.len(),
            seq = ticket.sequence()
        );
        self.call_key(
            "compare_and_swap",
            RouteKey::User(key.clone()),
            Deadline::after(self.inner.cfg.deadline),
            || CompareAndSwapRequest {
                keyspace: keyspace.to_owned(),
                key: key.clone(),
                expected: Some(expected.clone()),
                new_value: new_value.clone(),
                session: Some(ticket.session()),
            },
            |ch, req| async move { KvClient::new(ch).compare_and_swap(req).await },
        )
        .instrument(span)
        .await
        .map(|resp| CasOutcome {
            succeeded: resp.succeeded,
            current: resp.current_value,
        })
    }

    /// Each member's role, term and applied index, as gathered by the serving node.
    pub async fn cluster_status(&self) -> Result<ClusterStatusResponse, ClientError> {
        call(
            &self.inner.router,
            &self.inner.cfg,
            "cluster_status",
            || ClusterStatusRequest {},
            |ch, req| async move { AdminClient::new(ch).cluster_status(req).await },
        )
        .instrument(tracing::debug_span!("basalt.cluster_status"))
        .await
    }

    /// Adds node `id` at `addr` (`host:port`); it joins as a learner and is promoted once caught up.
    pub async fn add_member(&self, id: u64, addr: &str) -> Result<(), ClientError> {
        let address = addr.to_owned();
        call(
            &self.inner.router,
            &self.inner.cfg,
            "add_member",
            || AddMemberRequest {
                id,
                address: address.clone(),
            },
            |ch, req| async move { AdminClient::new(ch).add_member(req).await },
        )
        .instrument(tracing::debug_span!("basalt.add_member", id, addr))
        .await
        .map(|_| ())
    }

    /// Removes node `id` from the cluster.
    pub async fn remove_member(&self, id: u64) -> Result<(), ClientError> {
        call(
            &self.inner.router,
            &self.inner.cfg,
            "remove_member",
            || RemoveMemberRequest { id },
            |ch, req| async move { AdminClient::new(ch).remove_member(req).await },
        )
        .instrument(tracing::debug_span!("basalt.remove_member", id))
        .await
        .map(|_| ())
    }

    /// Asks the leader to hand leadership to node `to`.
    pub async fn transfer_leader(&self, to: u64) -> Result<(), ClientError> {
        call(
            &self.inner.router,
            &self.inner.cfg,
            "transfer_leader",
            || TransferLeaderRequest { to },
            |ch, req| async move { AdminClient::new(ch).transfer_leader(req).await },
        )
        .instrument(tracing::debug_span!("basalt.transfer_leader", to))
        .await
        .map(|_| ())
    }

    /// Creates keyspace `name`. `shards` 0 lets the server choose (1 for range, 16 for hash
    /// sharding) and `replicas` 0 means `min(3, live nodes)`. Returns the keyspace as created.
    pub async fn create_keyspace(
        &self,
        name: &str,
        sharding: Sharding,
        shards: u32,
        replicas: u32,
    ) -> Result<Keyspace, ClientError> {
        self.create_keyspace_with_read_mode(name, sharding, shards, replicas, ReadMode::KeyspaceDefault)
            .await
    }

    /// As [`Client::create_keyspace`], with `default_read` as the keyspace's default read mode
    /// (`KeyspaceDefault` means `linearizable`).
    pub async fn create_keyspace_with_read_mode(
        &self,
        name: &str,
        sharding: Sharding,
        shards: u32,
        replicas: u32,
        default_read: ReadMode,
    ) -> Result<Keyspace, ClientError> {
        let name = name.to_owned();
        call(
            &self.inner.router,
            &self.inner.cfg,
            "create_keyspace",
            || CreateKeyspaceRequest {
                name: name.clone(),
                sharding: sharding.to_wire(),
                shards,
                replicas,
                default_read: default_read.to_pb(),
            },
            |ch, req| async move { AdminClient::new(ch).create_keyspace(req).await },
        )
        .instrument(tracing::debug_span!(
            "basalt.create_keyspace",
            name,
            %sharding,
            shards,
            replicas
        ))
        .await
        .and_then(|resp| required(resp.keyspace, "create_keyspace", "keyspace"))
    }

    /// Every keyspace.
    pub async fn list_keyspaces(&self) -> Result<Vec<Keyspace>, ClientError> {
        call(
            &self.inner.router,
            &self.inner.cfg,
            "list_keyspaces",
            || ListKeyspacesRequest {},
            |ch, req| async move { AdminClient::new(ch).list_keyspaces(req).await },
        )
        .instrument(tracing::debug_span!("basalt.list_keyspaces"))
        .await
        .map(|resp| resp.keyspaces)
    }

    /// Keyspace `name` and its shards.
    pub async fn describe_keyspace(&self, name: &str) -> Result<KeyspaceDescription, ClientError> {
        let name = name.to_owned();
        call(
            &self.inner.router,
            &self.inner.cfg,
            "describe_keyspace",
            || DescribeKeyspaceRequest { name: name.clone() },
            |ch, req| async move { AdminClient::new(ch).describe_keyspace(req).await },
        )
        .instrument(tracing::debug_span!("basalt.describe_keyspace", name))
        .await
        .and_then(|resp| {
            Ok(KeyspaceDescription {
                keyspace: required(resp.keyspace, "describe_keyspace", "keyspace")?,
                shards: resp.shards,
            })
        })
    }

    /// Drops keyspace `name` and all its data.
    pub async fn drop_keyspace(&self, name: &str) -> Result<(), ClientError> {
        let name = name.to_owned();
        call(
            &self.inner.router,
            &self.inner.cfg,
            "drop_keyspace",
            || DropKeyspaceRequest { name: name.clone() },
            |ch, req| async move { AdminClient::new(ch).drop_keyspace(req).await },
        )
        .instrument(tracing::debug_span!("basalt.drop_keyspace", name))
        .await
        .map(|_| ())
    }

    /// The shards of `keyspace`, or of every keyspace for `None`. With `with_stats` each shard's
    /// leader is asked for its applied index and approximate size (slower).
    pub async fn list_shards(&self, keyspace: Option<&str>, with_stats: bool) -> Result<Vec<Shard>, ClientError> {
        let keyspace = keyspace.unwrap_or_default().to_owned();
        call(
            &self.inner.router,
            &self.inner.cfg,
            "list_shards",
            || ListShardsRequest {
                keyspace: keyspace.clone(),
                with_stats,
            },
            |ch, req| async move { AdminClient::new(ch).list_shards(req).await },
        )
        .instrument(tracing::debug_span!("basalt.list_shards", keyspace, with_stats))
        .await
        .map(|resp| resp.shards)
    }

    /// Splits shard `id` at `at`: a user key in a range keyspace, a decimal hash value in a hash
    /// keyspace; `None` lets the server pick the middle of the shard's data.
    ///
    /// Like every admin call this is retried until the deadline. Give `at` when that matters: a
    /// retry of a split that was applied but unanswered is then rejected (the shard already ends
    /// there), whereas with `None` it would split the lower half again.
    pub async fn split_shard(&self, id: u64, at: Option<Bytes>) -> Result<ShardSplit, ClientError> {
        let at = at.unwrap_or_default();
        call(
            &self.inner.router,
            &self.inner.cfg,
            "split_shard",
            || SplitShardRequest {
                shard_id: id,
                at: at.clone(),
                // Set only by the placement driver between nodes.
                new_group: 0,
                expected_epoch: 0,
            },
            |ch, req| async move { AdminClient::new(ch).split_shard(req).await },
        )
        .instrument(tracing::debug_span!("basalt.split_shard", id, at_len = at.len()))
        .await
        .and_then(|resp| {
            Ok(ShardSplit {
                left: required(resp.left, "split_shard", "left")?,
                right: required(resp.right, "split_shard", "right")?,
            })
        })
    }

    /// Merges shard `id` with the next shard of its keyspace, which then no longer exists; meant
    /// for small neighbours (the server refuses one holding more than 8 MiB). Writes to the
    /// absorbed shard's keys wait while the merge runs (the client retries them), reads go on.
    ///
    /// The neighbour is looked up first and named in the request, so a retry of a merge that was
    /// applied but unanswered is answered with the merged shard rather than merging the next
    /// neighbour as well.
    pub async fn merge_shard(&self, id: u64) -> Result<ShardMerge, ClientError> {
        let shards = self.list_shards(None, false).await?;
        let right = shards
            .iter()
            .find(|s| s.id == id)
            .and_then(|left| {
                shards
                    .iter()
                    .find(|s| s.keyspace_id == left.keyspace_id && !left.end.is_empty() && s.start == left.end)
            })
            .map_or(0, |s| s.id);
        call(
            &self.inner.router,
            &self.inner.cfg,
            "merge_shard",
            || MergeShardRequest {
                shard_id: id,
                right_shard_id: right,
            },
            |ch, req| async move { AdminClient::new(ch).merge_shard(req).await },
        )
        .instrument(tracing::debug_span!("basalt.merge_shard", id, right))
        .await
        .and_then(|resp| {
            Ok(ShardMerge {
                shard: required(resp.shard, "merge_shard", "shard")?,
                absorbed: right,
            })
        })
    }

    /// Moves shard `id`'s replica from node `from` to node `to`. Returns the shard afterwards.
    pub async fn move_shard(&self, id: u64, from: u64, to: u64) -> Result<Shard, ClientError> {
        call(
            &self.inner.router,
            &self.inner.cfg,
            "move_shard",
            || MoveShardRequest {
                shard_id: id,
                from_node: from,
                to_node: to,
            },
            |ch, req| async move { AdminClient::new(ch).move_shard(req).await },
        )
        .instrument(tracing::debug_span!("basalt.move_shard", id, from, to))
        .await
        .and_then(|resp| required(resp.shard, "move_shard", "shard"))
    }

    /// Asks shard `id`'s leader to hand leadership to node `to`.
    pub async fn transfer_shard_leader(&self, id: u64, to: u64) -> Result<(), ClientError> {
        call(
            &self.inner.router,
            &self.inner.cfg,
            "transfer_shard_leader",
            || TransferShardLeaderRequest {
                shard_id: id,
                to_node: to,
            },
            |ch, req| async move { AdminClient::new(ch).transfer_shard_leader(req).await },
        )
        .instrument(tracing::debug_span!("basalt.transfer_shard_leader", id, to))
        .await
        .map(|_| ())
    }

    /// The placement driver's view (from the meta group's leader): each node's replica and
    /// leader counts and liveness, and the driver's recent and running steps.
    pub async fn placement_status(&self) -> Result<PlacementStatusResponse, ClientError> {
        call(
            &self.inner.router,
            &self.inner.cfg,
            "placement_status",
            || PlacementStatusRequest {},
            |ch, req| async move { AdminClient::new(ch).placement_status(req).await },
        )
        .instrument(tracing::debug_span!("basalt.placement_status"))
        .await
    }

    /// Counters of the shard routing cache (shared by every handle of this client): how often
    /// a request's endpoint came from the cache, lookups, and what answers taught it.
    pub fn routing_stats(&self) -> RoutingStats {
        self.inner.cache.stats()
    }

    /// The shards of `keyspace` that the routing cache holds, in key order; `None` when it holds
    /// no routes for the keyspace (never used, or its lookup failed). For diagnostics and tests.
    pub fn cached_shards(&self, keyspace: &str) -> Option<Vec<CachedShard>> {
        self.inner.cache.snapshot(keyspace)
    }

    /// Runs one key-value call on this handle's keyspace, each attempt routed by `key` through
    /// the shard cache.
    async fn call_key<Req, Resp, B, F, Fut>(
        &self,
        op: &'static str,
        key: RouteKey,
        deadline: Deadline,
        build: B,
        rpc: F,
    ) -> Result<Resp, ClientError>
    where
        B: FnMut() -> Req,
        F: FnMut(tonic::transport::Channel, tonic::Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
        Resp: HasHeader,
    {
        self.call_key_in(op, key, deadline, false, build, rpc).await
    }

    /// As `call_key`; with `any_replica`, attempts go to the least loaded of the shard's
    /// replicas instead of its leader (reads in a mode any replica may serve).
    async fn call_key_in<Req, Resp, B, F, Fut>(
        &self,
        op: &'static str,
        key: RouteKey,
        deadline: Deadline,
        any_replica: bool,
        build: B,
        rpc: F,
    ) -> Result<Resp, ClientError>
    where
        B: FnMut() -> Req,
        F: FnMut(tonic::transport::Channel, tonic::Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
        Resp: HasHeader,
    {
        let inner = &*self.inner;
        let mut route = KeyRoute::new(&inner.router, &inner.cache, &inner.cfg, self.keyspace(), key);
        if any_replica {
            route = route.spread();
        }
        call_routed(&mut route, &inner.cfg, op, deadline, build, rpc).await
    }

    /// The leader's node id as last heard (from a response header or a `NotLeader` hint).
    pub fn leader_hint(&self) -> Option<u64> {
        self.inner.router.leader_id()
    }

    /// This client's write-session id (random, non-zero).
    pub fn client_id(&self) -> u64 {
        self.inner.session.client_id()
    }

    /// The highest sequence number such that every write numbered at or below it has finished.
    pub fn acked_through(&self) -> u64 {
        self.inner.session.acked_through()
    }

    /// Every endpoint the client knows: the configured ones, then those learned from hints.
    pub fn endpoints(&self) -> Vec<String> {
        self.inner.router.endpoints()
    }

    /// The configuration this client was created with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.cfg
    }
}

/// The error for a response that breaks the protocol's promises. It is not retried: the server
/// answered, and asking again would get the same answer.
fn protocol_violation(what: String) -> ClientError {
    ClientError::Server {
        code: Code::Internal,
        message: format!("protocol violation: {what}"),
    }
}

/// A message field the protocol says is always set.
fn required<T>(value: Option<T>, op: &str, field: &str) -> Result<T, ClientError> {
    value.ok_or_else(|| protocol_violation(format!("the {op} response has no `{field}`")))
}

/// The smallest key greater than `key`: `key` followed by a zero byte.
pub(crate) fn key_successor(key: &[u8]) -> Bytes {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    next.into()
}

/// One scan in progress: the range, what is left of the limit, where the next request continues,
/// and the pairs gathered so far. Kept apart from the RPCs so its decisions are unit-tested.
#[derive(Debug)]
struct ScanState {
    start: Bytes,
    /// Empty is unbounded, as on the wire.
    end: Bytes,
    /// 0: one server page.
    limit: u32,
    cursor: Bytes,
    kvs: Vec<(Bytes, Bytes)>,
    mode: ReadMode,
    /// See [`ScanPage::served`].
    served: Option<ServedRead>,
}

impl ScanState {
    /// The next request: the same range, the cursor, and what is left of the limit.
    fn request(&self, keyspace: &str) -> ScanRequest {
        ScanRequest {
            keyspace: keyspace.to_owned(),
            cursor: self.cursor.clone(),
            start: self.start.clone(),
            end: self.end.clone(),
            limit: self.remaining(),
            read: self.mode.to_pb(),
        }
    }

    /// Pairs still wanted; 0 (the server's page size) when no limit was given.
    fn remaining(&self) -> u32 {
        // Below `limit` while the scan goes on (`absorb` stops once it is reached), so this fits.
        u32::try_from(self.kvs.len()).map_or(0, |have| self.limit.saturating_sub(have))
    }

    /// Takes in one response; returns the page once the scan is done, `None` to go on.
    fn absorb(&mut self, response: ScanResponse) -> Result<Option<ScanPage>, ClientError> {
        let asked = self.remaining();
        let got = response.kvs.len();
        if asked != 0 && got > asked as usize {
            // Keeping only some would lose the position of the rest; the cursor is past them all.
            return Err(protocol_violation(format!(
                "a scan page holds {got} pairs for a limit of {asked}"
            )));
        }
        self.kvs.extend(response.kvs.into_iter().map(|kv| (kv.key, kv.value)));
        if let Some(info) = response.read.as_ref().map(ServedRead::from_pb) {
            self.served = Some(older(self.served, info));
        }
        if !response.more {
            return Ok(Some(self.finish(false, None)));
        }
        let enough = if self.limit == 0 {
            !self.kvs.is_empty()
        } else {
            self.kvs.len() >= self.limit as usize
        };
        if response.cursor.is_empty() {
            // A server that predates cursors (one range-sharded keyspace): continue after the
            // last key, which is only possible if this response made progress.
            if got == 0 {
                return Err(protocol_violation(
                    "a scan page is empty and has no cursor, yet claims more pairs follow".into(),
                ));
            }
            if enough {
                return Ok(Some(self.finish(true, None)));
            }
            if let Some((last, _)) = self.kvs.last() {
                self.start = key_successor(last);
            }
            self.cursor = Bytes::new();
            return Ok(None);
        }
        if got == 0 && response.cursor == self.cursor {
            return Err(protocol_violation(
                "a scan page is empty and its cursor does not move, yet it claims more pairs follow".into(),
            ));
        }
        if enough {
            return Ok(Some(self.finish(true, Some(response.cursor))));
        }
        self.cursor = response.cursor;
        Ok(None)
    }

    fn finish(&mut self, more: bool, cursor: Option<Bytes>) -> ScanPage {
        ScanPage {
            kvs: std::mem::take(&mut self.kvs),
            more,
            cursor,
            served: self.served.take(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_proto::v1::KeyValue;

    fn state(limit: u32) -> ScanState {
        ScanState {
            start: Bytes::from_static(b"a"),
            end: Bytes::new(),
            limit,
            cursor: Bytes::new(),
            kvs: Vec::new(),
            mode: ReadMode::KeyspaceDefault,
            served: None,
        }
    }

    fn response(keys: &[&str], more: bool, cursor: &str) -> ScanResponse {
        ScanResponse {
            header: None,
            read: None,
            kvs: keys
                .iter()
                .map(|k| KeyValue {
                    key: Bytes::copy_from_slice(k.as_bytes()),
                    value: Bytes::from_static(b"v"),
                })
                .collect(),
            more,
            cursor: Bytes::copy_from_slice(cursor.as_bytes()),
        }
    }

    fn keys(page: &ScanPage) -> Vec<&[u8]> {
        page.kvs.iter().map(|(k, _)| k.as_ref()).collect()
    }

    #[test]
    fn follows_cursors_through_empty_shards_until_the_limit() {
        let mut s = state(3);
        assert_eq!(s.request("ks").limit, 3);
        assert_eq!(s.absorb(response(&["a", "b"], true, "c1")).expect("valid"), None);
        let req = s.request("ks");
        assert_eq!(
            (req.limit, req.cursor.as_ref(), req.start.as_ref()),
            (1, &b"c1"[..], &b"a"[..])
        );
        assert_eq!(req.keyspace, "ks");
        // A shard boundary: nothing, but the cursor moves on.
        assert_eq!(s.absorb(response(&[], true, "c2")).expect("valid"), None);
        assert_eq!(s.request("ks").limit, 1);
        let page = s
            .absorb(response(&["x"], true, "c3"))
            .expect("valid")
            .expect("limit reached");
        assert_eq!(keys(&page), [b"a", b"b", b"x"]);
        assert!(page.more);
        assert_eq!(page.cursor, Some(Bytes::from_static(b"c3")));
    }

    #[test]
    fn an_exhausted_range_ends_the_scan_without_a_cursor() {
        let mut s = state(10);
        assert_eq!(s.absorb(response(&["a"], true, "c1")).expect("valid"), None);
        let page = s.absorb(response(&[], false, "")).expect("valid").expect("done");
        assert_eq!(keys(&page), [b"a"]);
        assert!(!page.more);
        assert_eq!(page.cursor, None);
    }

    #[test]
    fn limit_zero_returns_the_first_page_with_pairs() {
        let mut s = state(0);
        assert_eq!(s.request("ks").limit, 0);
        assert_eq!(s.absorb(response(&[], true, "c1")).expect("valid"), None);
        assert_eq!(s.request("ks").limit, 0);
        let page = s
            .absorb(response(&["m", "n"], true, "c2"))
            .expect("valid")
            .expect("a page with pairs");
        assert_eq!(keys(&page), [b"m", b"n"]);
        assert_eq!(page.cursor, Some(Bytes::from_static(b"c2")));
    }

    #[test]
    fn a_server_without_cursors_is_continued_after_the_last_key() {
        let mut s = state(3);
        assert_eq!(s.absorb(response(&["a", "b"], true, "")).expect("valid"), None);
        let req = s.request("ks");
        assert_eq!((req.start.as_ref(), req.cursor.as_ref()), (&b"b\0"[..], &b""[..]));
        let page = s
            .absorb(response(&["c"], true, ""))
            .expect("valid")
            .expect("limit reached");
        assert_eq!(keys(&page), [b"a", b"b", b"c"]);
        assert!(page.more);
        assert_eq!(page.cursor, None);
    }

    #[test]
    fn pages_that_cannot_make_progress_are_protocol_violations() {
        let mut s = state(5);
        s.cursor = Bytes::from_static(b"same");
        let err = s.absorb(response(&[], true, "same")).expect_err("stuck cursor");
        assert!(
            matches!(&err, ClientError::Server { code: Code::Internal, message } if message.contains("does not move")),
            "{err:?}"
        );
        let err = state(5)
            .absorb(response(&[], true, ""))
            .expect_err("no cursor, no pairs");
        assert!(err.to_string().contains("protocol violation"), "{err}");
        let err = state(1)
            .absorb(response(&["a", "b"], true, "c"))
            .expect_err("over the limit");
        assert!(err.to_string().contains("2 pairs for a limit of 1"), "{err}");
    }

    #[test]
    fn sharding_maps_to_and_from_the_wire() {
        for sharding in [Sharding::Range, Sharding::Hash] {
            assert_eq!(Sharding::from_wire(sharding.to_wire()), Some(sharding));
        }
        assert_eq!(Sharding::Range.to_wire(), WireSharding::Range as i32);
        assert_eq!(Sharding::from_wire(WireSharding::Unspecified as i32), None);
        assert_eq!(Sharding::from_wire(99), None);
        assert_eq!(Sharding::Hash.to_string(), "hash");
    }

    #[tokio::test]
    async fn keyspace_handles_share_the_session() {
        let client = Client::connect(ClientConfig::new(["127.0.0.1:1"]))
            .await
            .expect("valid config");
        assert_eq!(client.keyspace(), DEFAULT_KEYSPACE);
        let orders = client.with_keyspace("orders");
        assert_eq!(orders.keyspace(), "orders");
        assert_eq!(client.keyspace(), DEFAULT_KEYSPACE);
        assert_eq!(orders.client_id(), client.client_id());
        assert!(Arc::ptr_eq(&orders.inner, &client.inner));
        assert_eq!(orders.with_keyspace("").keyspace(), DEFAULT_KEYSPACE);
        assert!(format!("{orders:?}").contains("orders"));
    }
}
