//! The retry loop every client call runs through.
//!
//! One call = attempts against endpoints chosen by a [`Route`] (the [`Router`]'s rotation for
//! admin calls, the shard routing cache for key-value calls; see `route`) until one succeeds, a
//! definite error arrives, or the call's deadline passes. Each attempt is bounded by
//! `min(attempt_timeout, time left)`, both locally and through the `grpc-timeout` header so the
//! server can stop working on an abandoned attempt.
//!
//! Invariants:
//! - The request is rebuilt for every attempt by the caller's `build` closure; for a write that
//!   closure reuses the write's one sequence number, which is what makes retrying writes safe.
//! - A usable `NotLeader` hint is followed at once, without a backoff, since it points at the
//!   node most likely to succeed; but at most [`MAX_IMMEDIATE_REDIRECTS`] times in a row, so two
//!   nodes with stale views pointing at each other cannot make the client spin.
//!   The same holds for a `WrongShard` answer whose descriptor is newer than the routing cache's
//!   and names another node of the key's shard: the route says so, and the next attempt goes
//!   there at once, sharing the same limit.
//! - Every other retry waits a jittered exponential backoff first, and no wait or attempt
//!   extends past the deadline. That includes a `WrongShard` that teaches nothing new: the node
//!   answering it may be behind a split or move the cluster is still carrying out, so asking
//!   again at once would mostly hear the same answer.
//! - Choosing the target may take time (a routing lookup); the deadline is checked again after
//!   it, so the lookup counts against the call like any attempt.
//! - Several calls can share one [`Deadline`] (a scan that follows its cursor through many
//!   shards), so that an operation made of several requests is bounded as a whole, as one call is.

use std::future::Future;

use basalt_proto::v1::{
    AddMemberResponse, ClusterStatusResponse, CompareAndSwapResponse, CreateKeyspaceResponse, DeleteResponse,
    DescribeKeyspaceResponse, DropKeyspaceResponse, GetResponse, ListKeyspacesResponse, ListShardsResponse,
    MergeShardResponse, MoveShardResponse, PlacementStatusResponse, PutResponse, RemoveMemberResponse, ResponseHeader,
    ScanResponse, SplitShardResponse, TransferLeaderResponse, TransferShardLeaderResponse,
};
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::backoff::Backoff;
use crate::config::ClientConfig;
use crate::error::{classify, describe_status, describe_wrong_shard, ClientError, Disposition};
use crate::route::{ClusterRoute, Route};
use crate::router::Router;

/// Hint-following attempts allowed before a backoff is forced.
pub(crate) const MAX_IMMEDIATE_REDIRECTS: u32 = 3;

/// Responses carry the serving node's header, which feeds the routing cache.
pub(crate) trait HasHeader {
    fn header(&self) -> Option<&ResponseHeader>;
}

macro_rules! impl_has_header {
    ($($ty:ty),* $(,)?) => {
        $(impl HasHeader for $ty {
            fn header(&self) -> Option<&ResponseHeader> {
                self.header.as_ref()
            }
        })*
    };
}

impl_has_header!(
    PutResponse,
    GetResponse,
    DeleteResponse,
    ScanResponse,
    CompareAndSwapResponse,
    ClusterStatusResponse,
    AddMemberResponse,
    RemoveMemberResponse,
    TransferLeaderResponse,
    CreateKeyspaceResponse,
    ListKeyspacesResponse,
    DescribeKeyspaceResponse,
    DropKeyspaceResponse,
    ListShardsResponse,
    SplitShardResponse,
    MoveShardResponse,
    TransferShardLeaderResponse,
    PlacementStatusResponse,
    MergeShardResponse,
);

/// When an operation started and when it must end; `DeadlineExceeded` reports the time between
/// `started` and the moment it gave up.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadline {
    started: Instant,
    at: Instant,
}

impl Deadline {
    /// A deadline `limit` from now.
    pub(crate) fn after(limit: Duration) -> Self {
        let started = Instant::now();
        Self {
            started,
            at: started + limit,
        }
    }
}

/// Runs `rpc` with requests from `build` until success, a definite error, or the configured
/// deadline.
pub(crate) async fn call<Req, Resp, B, F, Fut>(
    router: &Router,
    cfg: &ClientConfig,
    op: &'static str,
    build: B,
    rpc: F,
) -> Result<Resp, ClientError>
where
    B: FnMut() -> Req,
    F: FnMut(Channel, Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<Resp>, Status>>,
    Resp: HasHeader,
{
    call_until(router, cfg, op, Deadline::after(cfg.deadline), build, rpc).await
}

/// As [`call`], ending at `deadline` (which other calls may share) instead of a fresh one.
pub(crate) async fn call_until<Req, Resp, B, F, Fut>(
    router: &Router,
    cfg: &ClientConfig,
    op: &'static str,
    deadline: Deadline,
    build: B,
    rpc: F,
) -> Result<Resp, ClientError>
where
    B: FnMut() -> Req,
    F: FnMut(Channel, Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<Resp>, Status>>,
    Resp: HasHeader,
{
    call_routed(&mut ClusterRoute(router), cfg, op, deadline, build, rpc).await
}

/// Runs `rpc` with requests from `build`, each attempt going where `route` says, until success,
/// a definite error, or `deadline`.
pub(crate) async fn call_routed<R, Req, Resp, B, F, Fut>(
    route: &mut R,
    cfg: &ClientConfig,
    op: &'static str,
    deadline: Deadline,
    mut build: B,
    mut rpc: F,
) -> Result<Resp, ClientError>
where
    R: Route,
    B: FnMut() -> Req,
    F: FnMut(Channel, Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<Resp>, Status>>,
    Resp: HasHeader,
{
    let Deadline { started, at: deadline } = deadline;
    let mut backoff = Backoff::new(cfg.backoff_initial, cfg.backoff_max);
    let mut last_error = String::from("no attempt was made");
    let mut redirects = 0u32;
    let mut attempt = 0u32;
    let exceeded = |attempt: u32, last_error: String| {
        tracing::debug!(op, attempts = attempt, %last_error, "deadline exceeded");
        Err(ClientError::DeadlineExceeded {
            after: Instant::now() - started,
            last_error,
        })
    };
    loop {
        if Instant::now() >= deadline {
            return exceeded(attempt, last_error);
        }
        let target = route.target(deadline).await;
        let now = Instant::now();
        if now >= deadline {
            return exceeded(attempt, last_error);
        }
        attempt += 1;
        let budget = cfg.attempt_timeout.min(deadline - now);
        let mut request = Request::new(build());
        request.set_timeout(budget);
        let outcome = tokio::time::timeout(budget, rpc(target.channel.clone(), request)).await;
        let status = match outcome {
            Ok(Ok(response)) => {
                let response = response.into_inner();
                route.on_success(&target, response.header());
                if attempt > 1 {
                    tracing::debug!(op, attempts = attempt, endpoint = %target.addr, "succeeded after retries");
                }
                return Ok(response);
            }
            Ok(Err(status)) => status,
            Err(_elapsed) => {
                last_error = format!("{} timed out after {budget:?}", target.addr);
                tracing::debug!(op, attempt, endpoint = %target.addr, ?budget, "attempt timed out");
                route.on_failure(&target);
                backoff_sleep(&mut backoff, deadline).await;
                redirects = 0;
                continue;
            }
        };
        last_error = format!("{}: {}", target.addr, describe_status(&status));
        let at_once = match classify(&status) {
            Disposition::Fail(err) => {
                tracing::debug!(op, attempt, endpoint = %target.addr, error = %err, "definite error");
                route.on_error(&err);
                return Err(err);
            }
            Disposition::NotLeader { leader_id, leader_addr } => {
                tracing::debug!(op, attempt, endpoint = %target.addr, leader_id, %leader_addr, "not leader");
                route.on_not_leader(&target, leader_id, &leader_addr)
            }
            Disposition::WrongShard { keyspace, current } => {
                last_error = describe_wrong_shard(&target.addr, &keyspace, &status);
                tracing::debug!(
                    op,
                    attempt,
                    endpoint = %target.addr,
                    %keyspace,
                    shard = current.as_ref().map(|s| s.id),
                    epoch = current.as_ref().map(|s| s.epoch),
                    "wrong shard"
                );
                route.on_wrong_shard(&target, current.as_deref())
            }
            Disposition::Retry => {
                tracing::debug!(op, attempt, endpoint = %target.addr, error = %last_error, "transient failure");
                route.on_failure(&target);
                false
            }
        };
        if at_once && redirects < MAX_IMMEDIATE_REDIRECTS {
            redirects += 1;
            continue;
        }
        backoff_sleep(&mut backoff, deadline).await;
        redirects = 0;
    }
}

async fn backoff_sleep(backoff: &mut Backoff, deadline: Instant) {
    let delay = backoff.next_delay(&mut rand::rng());
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::sleep(delay.min(left)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::EndpointAddr;
    use basalt_proto::status_with_detail;
    use basalt_proto::v1::{NotLeader, Replica, Shard, WrongShard};
    use basalt_proto::ErrorKind;
    use parking_lot::Mutex;
    use std::sync::Arc;

    fn setup(addrs: &[&str], deadline_ms: u64) -> (Router, ClientConfig) {
        let mut cfg = ClientConfig::new(addrs.iter().copied());
        cfg.deadline = Duration::from_millis(deadline_ms);
        cfg.attempt_timeout = Duration::from_millis(50);
        cfg.backoff_initial = Duration::from_millis(4);
        cfg.backoff_max = Duration::from_millis(8);
        let seeds = addrs
            .iter()
            .map(|a| EndpointAddr::parse(a).expect("test addresses are valid"))
            .collect();
        (Router::new(seeds, cfg.attempt_timeout, basalt_proto::Dialer::Tcp), cfg)
    }

    /// Runs `call` with a scripted rpc: `script(attempt_number, endpoint)` decides the outcome
    /// (`None` = hang until the attempt times out). Returns the result and the endpoints tried.
    async fn run(
        router: &Router,
        cfg: &ClientConfig,
        script: impl Fn(usize, &str) -> Option<Result<PutResponse, Status>>,
    ) -> (Result<PutResponse, ClientError>, Vec<String>) {
        let tried = Arc::new(Mutex::new(Vec::<String>::new()));
        let script = &script;
        let result = call(
            router,
            cfg,
            "test",
            || (),
            |_channel, _request: Request<()>| {
                let endpoint = router.target().addr;
                let n = {
                    let mut t = tried.lock();
                    t.push(endpoint.clone());
                    t.len()
                };
                let outcome = script(n, &endpoint);
                async move {
                    match outcome {
                        Some(r) => r.map(Response::new),
                        None => std::future::pending().await,
                    }
                }
            },
        )
        .await;
        let tried = tried.lock().clone();
        (result, tried)
    }

    fn ok() -> Result<PutResponse, Status> {
        Ok(PutResponse::default())
    }

    fn not_leader(id: u64, addr: &str) -> Result<PutResponse, Status> {
        Err(status_with_detail(
            "not leader",
            ErrorKind::NotLeader(NotLeader {
                leader_id: id,
                leader_addr: addr.into(),
            }),
        ))
    }

    fn wrong_shard(replicas: &[&str]) -> Result<PutResponse, Status> {
        Err(status_with_detail(
            "wrong shard",
            ErrorKind::WrongShard(WrongShard {
                keyspace: "orders".into(),
                current: Some(Shard {
                    id: 9,
                    replicas: replicas
                        .iter()
                        .map(|a| Replica {
                            node_id: 0,
                            address: (*a).into(),
                        })
                        .collect(),
                    ..Default::default()
                }),
            }),
        ))
    }

    #[tokio::test]
    async fn wrong_shard_backs_off_and_reaches_a_replica_the_seeds_lack() {
        let (router, cfg) = setup(&["a:1"], 2_000);
        let started = std::time::Instant::now();
        let (res, tried) = run(&router, &cfg, |_, ep| {
            Some(if ep == "a:1" { wrong_shard(&["z:9"]) } else { ok() })
        })
        .await;
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(tried, ["a:1", "z:9"]);
        // Unlike a leader hint, the retry waited a backoff (at least half the initial 4ms).
        assert!(started.elapsed() >= Duration::from_millis(2), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn wrong_shard_until_the_deadline_says_routing_kept_failing() {
        let (router, cfg) = setup(&["a:1", "b:2"], 80);
        let (res, tried) = run(&router, &cfg, |_, _| Some(wrong_shard(&[]))).await;
        match res {
            Err(ClientError::DeadlineExceeded { after, last_error }) => {
                assert!(after >= Duration::from_millis(80), "{after:?}");
                assert!(last_error.starts_with("routing kept failing: "), "{last_error}");
                assert!(last_error.contains("\"orders\""), "{last_error}");
            }
            other => panic!("expected DeadlineExceeded, got {other:?}"),
        }
        // Both endpoints were tried in turn.
        assert!(
            tried.iter().any(|e| e == "a:1") && tried.iter().any(|e| e == "b:2"),
            "{tried:?}"
        );
    }

    #[tokio::test]
    async fn a_shared_deadline_bounds_consecutive_calls() {
        let (router, cfg) = setup(&["a:1"], 10_000);
        let deadline = Deadline::after(Duration::from_millis(60));
        tokio::time::sleep(Duration::from_millis(70)).await;
        let res: Result<PutResponse, ClientError> = call_until(
            &router,
            &cfg,
            "test",
            deadline,
            || (),
            |_channel, _request: Request<()>| async { Ok(Response::new(PutResponse::default())) },
        )
        .await;
        match res {
            Err(ClientError::DeadlineExceeded { after, last_error }) => {
                assert!(after >= Duration::from_millis(70), "{after:?}");
                assert_eq!(last_error, "no attempt was made");
            }
            other => panic!("expected DeadlineExceeded, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn transient_failures_rotate_then_succeed() {
        let (router, cfg) = setup(&["a:1", "b:2", "c:3"], 2_000);
        let (res, tried) = run(&router, &cfg, |n, _| {
            Some(if n < 3 { Err(Status::unavailable("down")) } else { ok() })
        })
        .await;
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(tried, ["a:1", "b:2", "c:3"]);
    }

    #[tokio::test]
    async fn definite_errors_are_not_retried() {
        let (router, cfg) = setup(&["a:1", "b:2"], 2_000);
        let (res, tried) = run(&router, &cfg, |_, _| Some(Err(Status::invalid_argument("empty key")))).await;
        assert!(matches!(res, Err(ClientError::InvalidArgument { .. })), "{res:?}");
        assert_eq!(tried.len(), 1);
    }

    #[tokio::test]
    async fn hint_is_followed_immediately() {
        let (router, cfg) = setup(&["a:1"], 2_000);
        let (res, tried) = run(&router, &cfg, |_, ep| {
            Some(if ep == "a:1" { not_leader(2, "b:2") } else { ok() })
        })
        .await;
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(tried, ["a:1", "b:2"]);
        assert_eq!(router.leader_id(), Some(2));
    }

    #[tokio::test]
    async fn ping_pong_hints_are_rate_limited_until_the_deadline() {
        let (router, cfg) = setup(&["a:1", "b:2"], 150);
        let started = std::time::Instant::now();
        let (res, tried) = run(&router, &cfg, |_, ep| {
            Some(if ep == "a:1" {
                not_leader(2, "b:2")
            } else {
                not_leader(1, "a:1")
            })
        })
        .await;
        let elapsed = started.elapsed();
        match res {
            Err(ClientError::DeadlineExceeded { after, last_error }) => {
                assert!(after >= Duration::from_millis(150), "{after:?}");
                assert!(last_error.contains("not leader"), "{last_error}");
            }
            other => panic!("expected DeadlineExceeded, got {other:?}"),
        }
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        // Backoffs are at least 2ms, so 150ms allows at most ~75 rounds of 4 attempts; an
        // unthrottled loop would make many thousands.
        assert!(tried.len() <= 4 * 80, "{} attempts", tried.len());
        assert!(tried.len() > 4, "{} attempts", tried.len());
    }

    #[tokio::test]
    async fn a_hung_attempt_times_out_and_moves_on() {
        let (router, cfg) = setup(&["a:1", "b:2"], 2_000);
        let (res, tried) = run(&router, &cfg, |_, ep| if ep == "a:1" { None } else { Some(ok()) }).await;
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(tried, ["a:1", "b:2"]);
    }

    #[tokio::test]
    async fn deadline_reports_the_last_error() {
        let (router, cfg) = setup(&["a:1", "b:2"], 60);
        let (res, _) = run(&router, &cfg, |_, _| Some(Err(Status::unavailable("refused")))).await;
        match res {
            Err(ClientError::DeadlineExceeded { after, last_error }) => {
                assert!(after >= Duration::from_millis(60));
                assert!(last_error.contains("refused"), "{last_error}");
            }
            other => panic!("expected DeadlineExceeded, got {other:?}"),
        }
    }
}
