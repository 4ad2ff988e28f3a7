//! [`Client`]: the public Rust API of Basalt (key-value operations and cluster administration).
//!
//! A `Client` is a cheap handle (`Arc` inside) meant to be cloned into many tasks; all clones share
//! one routing cache, one set of channels and one write session.
//!
//! Invariants:
//! - Every write (`put`, `delete`, `compare_and_swap`) takes exactly one session sequence number
//!   before its first attempt and sends that number on every retry, so the server applies it at
//!   most once; the number is released when the call returns or is dropped (see `session`).
//! - Reads and admin calls carry no session (the protocol has none for them). Reads are
//!   idempotent. An admin call whose earlier attempt was applied but unanswered is retried like
//!   any other, so the retry may report the server's verdict on the repeated change (for example
//!   that the member already exists) rather than the original success.
//! - Every call is bounded by the configured deadline; no call waits forever.

use std::fmt;
use std::sync::Arc;

use basalt_proto::v1::admin_client::AdminClient;
use basalt_proto::v1::compare_and_swap_request::Expected;
use basalt_proto::v1::kv_client::KvClient;
use basalt_proto::v1::{
    AddMemberRequest, ClusterStatusRequest, ClusterStatusResponse, CompareAndSwapRequest, DeleteRequest, GetRequest,
    PutRequest, RemoveMemberRequest, ScanRequest, TransferLeaderRequest,
};
use basalt_proto::Dialer;
use bytes::Bytes;
use tracing::Instrument;

use crate::config::ClientConfig;
use crate::error::ClientError;
use crate::retry::call;
use crate::router::Router;
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

/// One page of a scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanPage {
    /// Pairs in ascending key order.
    pub kvs: Vec<(Bytes, Bytes)>,
    /// True when the range holds more pairs: continue from the last key's successor
    /// (the last key followed by a zero byte).
    pub more: bool,
}

/// A handle to a Basalt cluster. Cheap to clone; clones share routing state and the write session.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ClientConfig,
    router: Router,
    session: SessionTracker,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("client_id", &self.inner.session.client_id())
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
            inner: Arc::new(Inner { cfg, router, session }),
        })
    }

    /// Writes `value` under `key`, exactly once.
    pub async fn put(&self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Result<(), ClientError> {
        let (key, value) = (key.into(), value.into());
        let ticket = self.inner.session.begin();
        let span = tracing::debug_span!(
            "basalt.put",
            key_len = key.len(),
            value_len = value.len(),
            seq = ticket.sequence()
        );
        call(
            &self.inner.router,
            &self.inner.cfg,
            "put",
            || PutRequest {
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
        let key = key.into();
        let span = tracing::debug_span!("basalt.get", key_len = key.len());
        call(
            &self.inner.router,
            &self.inner.cfg,
            "get",
            || GetRequest { key: key.clone() },
            |ch, req| async move { KvClient::new(ch).get(req).await },
        )
        .instrument(span)
        .await
        .map(|resp| resp.value)
    }

    /// Deletes `key`, exactly once. Returns whether it existed.
    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<bool, ClientError> {
        let key = key.into();
        let ticket = self.inner.session.begin();
        let span = tracing::debug_span!("basalt.delete", key_len = key.len(), seq = ticket.sequence());
        call(
            &self.inner.router,
            &self.inner.cfg,
            "delete",
            || DeleteRequest {
                key: key.clone(),
                session: Some(ticket.session()),
            },
            |ch, req| async move { KvClient::new(ch).delete(req).await },
        )
        .instrument(span)
        .await
        .map(|resp| resp.existed)
    }

    /// One page of the pairs in `[start, end)` in ascending key order; `end: None` is unbounded
    /// and `limit` 0 asks for the server's maximum page size. Linearizable.
    ///
    /// `Some(end)` below `start` is rejected; `Some(end) == start` is an empty range and returns
    /// an empty page without asking the server (on the wire an empty `end` means "unbounded", so
    /// `Some(b"")` could not be sent faithfully).
    pub async fn scan(&self, start: impl Into<Bytes>, end: Option<Bytes>, limit: u32) -> Result<ScanPage, ClientError> {
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
        let span = tracing::debug_span!("basalt.scan", start_len = start.len(), end_len = end.len(), limit);
        call(
            &self.inner.router,
            &self.inner.cfg,
            "scan",
            || ScanRequest {
                start: start.clone(),
                end: end.clone(),
                limit,
            },
            |ch, req| async move { KvClient::new(ch).scan(req).await },
        )
        .instrument(span)
        .await
        .map(|resp| ScanPage {
            kvs: resp.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect(),
            more: resp.more,
        })
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
        let span = tracing::debug_span!("basalt.compare_and_swap", key_len = key.len(), seq = ticket.sequence());
        call(
            &self.inner.router,
            &self.inner.cfg,
            "compare_and_swap",
            || CompareAndSwapRequest {
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
