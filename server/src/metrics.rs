//! The node's Prometheus metrics and the HTTP endpoint that serves them.
//!
//! Counters and histograms are updated on the request path; Raft gauges (term, commit, applied,
//! leadership) are sampled from each group's status when `/metrics` is scraped, so they cost
//! nothing between scrapes and are never stale. Storage (fsyncs, entries per fsync) and consensus
//! (snapshot events, peer traffic by kind, hibernation events) register their own metrics in the
//! same registry; the count of replicas in each hibernation state is sampled at scrape time too.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Instant;

use basalt_consensus::raft::hibernation::census;
use basalt_consensus::raft::peer_service::GroupRegistry;
use basalt_consensus::{ReadGrant, ReadMode, Replication, Role, Staleness};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;

#[derive(Clone)]
pub struct ServerMetrics {
    pub registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    forwarded: IntCounterVec,
    forwards_abandoned: IntCounterVec,
    raft: IntGaugeVec,
    hibernation: IntGaugeVec,
    reads: IntCounterVec,
    staleness: HistogramVec,
}

impl ServerMetrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "basalt_requests_total",
                "Client requests by method and gRPC status code",
            ),
            &["method", "code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("basalt_request_duration_seconds", "Client request latency by method")
                .buckets(prometheus::exponential_buckets(0.0001, 2.0, 18)?),
            &["method"],
        )?;
        let forwarded = IntCounterVec::new(
            Opts::new(
                "basalt_requests_forwarded_total",
                "Requests forwarded to the leader by method",
            ),
            &["method"],
        )?;
        let forwards_abandoned = IntCounterVec::new(
            Opts::new(
                "basalt_forwards_abandoned_total",
                "Forwarded requests given up because the leader changed while they were in flight",
            ),
            &["method"],
        )?;
        let raft = IntGaugeVec::new(
            Opts::new(
                "basalt_raft",
                "Raft state per group: term, last_log_index, commit_index, applied_index, snapshot_index, is_leader",
            ),
            &["group", "field"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(forwarded.clone()))?;
        registry.register(Box::new(forwards_abandoned.clone()))?;
        let hibernation = IntGaugeVec::new(
            Opts::new(
                "basalt_raft_hibernation_groups",
                "Local replicas by hibernation state: awake, quiescing, quiesced (leaders not ticking), \
                 asleep (followers not ticking), dormant (reopened, not yet settled)",
            ),
            &["state"],
        )?;
        registry.register(Box::new(raft.clone()))?;
        registry.register(Box::new(hibernation.clone()))?;
        let reads = IntCounterVec::new(
            Opts::new(
                "basalt_reads_served_total",
                "Reads served from this node's replicas, by method and the read mode that served them",
            ),
            &["method", "mode"],
        )?;
        let staleness = HistogramVec::new(
            HistogramOpts::new(
                "basalt_read_staleness_bound_seconds",
                "The staleness bound reported by bounded_staleness and stale reads served here",
            )
            .buckets(prometheus::exponential_buckets(0.01, 2.0, 14)?),
            &["mode"],
        )?;
        registry.register(Box::new(reads.clone()))?;
        registry.register(Box::new(staleness.clone()))?;
        Ok(Self {
            registry,
            requests,
            latency,
            forwarded,
            forwards_abandoned,
            raft,
            hibernation,
            reads,
            staleness,
        })
    }

    /// Counts a read served here in the mode `grant` says, with its staleness bound if it has one.
    pub fn read_served(&self, method: &str, grant: &ReadGrant) {
        let mode = match grant.mode {
            ReadMode::Linearizable => "linearizable",
            ReadMode::Lease => "lease",
            ReadMode::Follower => "follower",
            ReadMode::BoundedStaleness(_) => "bounded_staleness",
            ReadMode::Stale => "stale",
        };
        self.reads.with_label_values(&[method, mode]).inc();
        if let Staleness::AtMost(d) = grant.staleness {
            self.staleness.with_label_values(&[mode]).observe(d.as_secs_f64());
        }
    }

    pub fn observe(&self, method: &str, started: Instant, code: tonic::Code) {
        self.latency
            .with_label_values(&[method])
            .observe(started.elapsed().as_secs_f64());
        self.requests.with_label_values(&[method, code_name(code)]).inc();
    }

    /// Runs one gRPC call inside a span, counting it by method and status code and timing it.
    /// Failures other than bad input are logged at debug: they are normal during elections
    /// (the client retries), and the counters show their rate.
    pub async fn timed<T>(
        &self,
        service: &'static str,
        node: u64,
        method: &'static str,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<tonic::Response<T>, tonic::Status> {
        let started = Instant::now();
        let span = tracing::info_span!("request", service, method, node);
        let r = tracing::Instrument::instrument(f, span).await;
        let code = r.as_ref().map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code());
        if code != tonic::Code::Ok && code != tonic::Code::InvalidArgument {
            tracing::debug!(service, method, ?code, "request failed");
        }
        self.observe(method, started, code);
        r
    }

    pub fn forwarded(&self, method: &str) {
        self.forwarded.with_label_values(&[method]).inc();
    }

    pub fn forward_abandoned(&self, method: &str) {
        self.forwards_abandoned.with_label_values(&[method]).inc();
    }

    fn sample(&self, groups: &GroupRegistry) {
        // Only the groups hosted now: a merged-away or dropped group must not linger in the output.
        self.raft.reset();
        for g in groups.all() {
            let s = g.status();
            let id = s.group_id.to_string();
            let set = |field: &str, v: u64| {
                self.raft
                    .with_label_values(&[id.as_str(), field])
                    .set(i64::try_from(v).unwrap_or(i64::MAX))
            };
            set("term", s.term);
            set("last_log_index", s.last_log_index);
            set("commit_index", s.commit_index);
            set("applied_index", s.applied_index);
            set("snapshot_index", s.snapshot_index);
            set("is_leader", u64::from(s.role == Role::Leader));
        }
        let c = census(groups);
        for (state, n) in [
            ("awake", c.awake),
            ("quiescing", c.quiescing),
            ("quiesced", c.quiesced),
            ("asleep", c.asleep),
            ("dormant", c.dormant),
        ] {
            self.hibernation
                .with_label_values(&[state])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// The text exposition of every registered metric.
    pub fn render(&self, groups: &GroupRegistry) -> Vec<u8> {
        self.sample(groups);
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        InvalidArgument => "invalid_argument",
        NotFound => "not_found",
        FailedPrecondition => "failed_precondition",
        Unavailable => "unavailable",
        DeadlineExceeded => "deadline_exceeded",
        DataLoss => "data_loss",
        Internal => "internal",
        _ => "other",
    }
}

/// Serves `GET /metrics` until `shutdown` resolves. Binds first so a bad address fails the start.
pub async fn bind_metrics(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

pub async fn serve_metrics(
    listener: TcpListener,
    metrics: ServerMetrics,
    groups: GroupRegistry,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut shutdown = shutdown;
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let (metrics, groups) = (metrics.clone(), groups.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let body = if req.uri().path() == "/metrics" {
                    Response::new(Full::new(Bytes::from(metrics.render(&groups))))
                } else {
                    let mut r = Response::new(Full::new(Bytes::from_static(b"see /metrics\n")));
                    *r.status_mut() = hyper::StatusCode::NOT_FOUND;
                    r
                };
                async move { Ok::<_, Infallible>(body) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!(error = %e, "metrics connection");
            }
        });
    }
}
