//! Basalt's Rust client library, and the implementation of the `basaltctl` command-line tool.
//!
//! ```no_run
//! # async fn demo() -> Result<(), basalt_client::ClientError> {
//! use basalt_client::{Client, ClientConfig, Expect};
//!
//! let client = Client::connect(ClientConfig::new(["127.0.0.1:7379"])).await?;
//! client.put("greeting", "hello").await?;
//! assert_eq!(client.get("greeting").await?.as_deref(), Some(&b"hello"[..]));
//! let cas = client
//!     .compare_and_swap("greeting", Expect::Value("hello".into()), "bye")
//!     .await?;
//! assert!(cas.succeeded);
//! # Ok(())
//! # }
//! ```
//!
//! The guarantees the library gives, and where each is kept:
//! - **Leader discovery** (`router`): the client follows `NotLeader` hints at once, remembers the
//!   endpoint that last worked, and otherwise rotates through the endpoints it knows.
//! - **Bounded retries** (`retry`, `backoff`): transient failures are retried with jittered
//!   exponential backoff until the call's deadline, then reported as
//!   [`ClientError::DeadlineExceeded`]; definite errors are reported at once (`error`).
//! - **Exactly-once writes** (`session`): each write carries `(client_id, sequence)`, the same on
//!   every retry, so the server applies it at most once.
//! - **Keyspaces and shards** (`client`): a handle targets one keyspace
//!   ([`Client::with_keyspace`]); a node that holds no replica of a key's shard answers
//!   `WrongShard`, which is routed around like a node without a leader and never reaches the
//!   caller before the deadline; scans follow the server's cursor from shard to shard.
//! - **Routing cache** (`routing`, `route`): per keyspace, the client caches shard descriptors
//!   (looked up with `DescribeKeyspace` on first use and on a miss, at most
//!   [`MAX_SHARDS_PER_KEYSPACE`] per keyspace) and each shard's leader, and sends a key's
//!   requests straight to its shard's leader; `WrongShard`, `NotLeader` and response headers
//!   keep it current. [`Client::routing_stats`] shows how well it does.
//!
//! - **Read modes** (`read_mode`): reads ask for `linearizable` (the default), `lease`,
//!   `follower`, `bounded_staleness(max)` or `stale` per handle ([`Client::with_read_mode`]) or
//!   per client ([`ClientConfig::read_mode`]); the modes any replica may serve go to the least
//!   loaded replica of the shard rather than its leader, and [`Client::read`] reports how each
//!   read was served.
//!
//! The [`cli`] module is `basaltctl`; it lives in the library so its parsing and formatting are
//! unit-tested like the rest.

mod backoff;
pub mod cli;
mod client;
mod config;
mod endpoint;
mod error;
mod read_mode;
mod retry;
mod route;
mod router;
mod routing;
mod session;

pub use basalt_proto::v1::{ClusterStatusResponse, Keyspace, Member, Replica, Role, Shard};
pub use basalt_proto::Dialer;
pub use client::{
    CasOutcome, Client, Expect, KeyspaceDescription, Read, ScanPage, ShardMerge, ShardSplit, Sharding, DEFAULT_KEYSPACE,
};
pub use config::ClientConfig;
pub use endpoint::{parse_endpoint_list, EndpointAddr};
pub use error::ClientError;
pub use read_mode::{ReadMode, ServedRead};
pub use routing::{CachedShard, RoutingStats, MAX_KEYSPACES, MAX_SHARDS_PER_KEYSPACE};
