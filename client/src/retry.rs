//! The retry loop every client call runs through.
//!
//! One call = attempts against endpoints chosen by the [`Router`] until one succeeds, a definite
//! error arrives, or the call's deadline passes. Each attempt is bounded by
//! `min(attempt_timeout, time left)`, both locally and through the `grpc-timeout` header so the
//! server can stop working on an abandoned attempt.
//!
//! Invariants:
//! - The request is rebuilt for every attempt by the caller's `build` closure; for a write that
//!   closure reuses the write's one sequence number, which is what makes retrying writes safe.
//! - A usable `NotLeader` hint is followed at once, without a backoff, since it points at the
//!   node most likely to succeed; but at most [`MAX_IMMEDIATE_REDIRECTS`] times in a row, so two
//!   nodes with stale views pointing at each other cannot make the client spin.
//! - Every other retry waits a jittered exponential backoff first, and no wait or attempt
//!   extends past the deadline.

use std::future::Future;

use basalt_proto::v1::{
    AddMemberResponse, ClusterStatusResponse, CompareAndSwapResponse, DeleteResponse, GetResponse, PutResponse,
    RemoveMemberResponse, ResponseHeader, ScanResponse, TransferLeaderResponse,
};
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::backoff::Backoff;
use crate::config::ClientConfig;
use crate::error::{classify, describe_status, ClientError, Disposition};
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
);

/// Runs `rpc` with requests from `build` until success, a definite error, or the deadline.
pub(crate) async fn call<Req, Resp, B, F, Fut>(
    router: &Router,
    cfg: &ClientConfig,
    op: &'static str,
    mut build: B,
    mut rpc: F,
) -> Result<Resp, ClientError>
where
    B: FnMut() -> Req,
    F: FnMut(Channel, Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<Resp>, Status>>,
    Resp: HasHeader,
{
    let started = Instant::now();
    let deadline = started + cfg.deadline;
    let mut backoff = Backoff::new(cfg.backoff_initial, cfg.backoff_max);
    let mut last_error = String::from("no attempt was made");
    let mut redirects = 0u32;
    let mut attempt = 0u32;
    loop {
        let now = Instant::now();
        if now >= deadline {
            tracing::debug!(op, attempts = attempt, %last_error, "deadline exceeded");
            return Err(ClientError::DeadlineExceeded {
                after: now - started,
                last_error,
            });
        }
        attempt += 1;
        let target = router.target();
        let budget = cfg.attempt_timeout.min(deadline - now);
        let mut request = Request::new(build());
        request.set_timeout(budget);
        let outcome = tokio::time::timeout(budget, rpc(target.channel.clone(), request)).await;
        let status = match outcome {
            Ok(Ok(response)) => {
                let response = response.into_inner();
                router.on_success(target.index, response.header());
                if attempt > 1 {
                    tracing::debug!(op, attempts = attempt, endpoint = %target.addr, "succeeded after retries");
                }
                return Ok(response);
            }
            Ok(Err(status)) => status,
            Err(_elapsed) => {
                last_error = format!("{} timed out after {budget:?}", target.addr);
                tracing::debug!(op, attempt, endpoint = %target.addr, ?budget, "attempt timed out");
                router.on_failure(target.index);
                backoff_sleep(&mut backoff, deadline).await;
                redirects = 0;
                continue;
            }
        };
        last_error = format!("{}: {}", target.addr, describe_status(&status));
        match classify(&status) {
            Disposition::Fail(err) => {
                tracing::debug!(op, attempt, endpoint = %target.addr, error = %err, "definite error");
                return Err(err);
            }
            Disposition::NotLeader { leader_id, leader_addr } => {
                tracing::debug!(op, attempt, endpoint = %target.addr, leader_id, %leader_addr, "not leader");
                let followed = router.on_not_leader(target.index, leader_id, &leader_addr);
                if followed.is_some() && redirects < MAX_IMMEDIATE_REDIRECTS {
                    redirects += 1;
                    continue;
                }
            }
            Disposition::Retry => {
                tracing::debug!(op, attempt, endpoint = %target.addr, error = %last_error, "transient failure");
                router.on_failure(target.index);
            }
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
    use basalt_proto::v1::NotLeader;
    use basalt_proto::ErrorKind;
    use parking_lot::Mutex;
    use std::sync::Arc;
    use std::time::Duration;

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
