//! The client's error type and the classification of gRPC statuses into "retry", "follow the
//! leader hint" and "give up".
//!
//! Invariants:
//! - A status is retried only when retrying cannot change the outcome of the operation: reads are
//!   idempotent and every write carries its session sequence, so the server applies it at most
//!   once however often it is sent. What is retried is decided by the status code alone (plus the
//!   `NotLeader` and `WrongShard` details), never by parsing messages, so that the decision is the
//!   same for every server version.
//! - `WrongShard` (the node holds no replica of the key's shard: it split, merged or moved, or
//!   the client asked a node outside the shard's group) is always retried, whatever its status
//!   code: it says nothing about the operation, only about where it was sent. It never reaches
//!   the caller as its own error; when it is still the answer at the deadline, the caller gets
//!   [`ClientError::DeadlineExceeded`] whose `last_error` says that routing kept failing.
//! - Errors the server raises deliberately and that a retry would only repeat (`INVALID_ARGUMENT`,
//!   `FAILED_PRECONDITION`/`SessionExpired`, `DATA_LOSS`/`Corruption`, and any other code that
//!   is not transient) surface at once as a typed error.

use std::time::Duration;

use basalt_proto::v1::{ErrorDetail, Shard};
use basalt_proto::ErrorKind;
use tonic::{Code, Status};

/// Everything a [`crate::Client`] call can fail with.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// The request was rejected as malformed (by the server, or by the client before sending).
    #[error("invalid argument `{field}`: {reason}")]
    InvalidArgument { field: String, reason: String },

    /// No attempt succeeded before the call's deadline. For a write the outcome is unknown: it
    /// may have been applied.
    #[error("deadline exceeded after {after:?}; last error: {last_error}")]
    DeadlineExceeded { after: Duration, last_error: String },

    /// The server has forgotten this write's outcome because the session moved past it. The
    /// write may or may not have been applied.
    #[error("write session expired: the server no longer knows this write's outcome")]
    SessionExpired,

    /// A replica found corrupt data and stopped serving.
    #[error("replica reported corruption: {0}")]
    Corruption(String),

    /// Any other status the server answered with that a retry would not fix.
    #[error("server error ({code:?}): {message}")]
    Server { code: Code, message: String },

    /// The client configuration is unusable (no endpoints, malformed endpoint, bad timeouts).
    #[error("invalid client configuration: {0}")]
    Config(String),
}

impl ClientError {
    /// Whether a write that failed with this error may nonetheless have been applied. Only
    /// errors raised before the server accepted the request are definite.
    pub fn outcome_unknown(&self) -> bool {
        !matches!(self, ClientError::InvalidArgument { .. } | ClientError::Config(_))
    }
}

/// What the retry loop should do with a failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Disposition {
    /// The node is not the leader; `leader_id` 0 means it knows of none (election under way) and
    /// an empty `leader_addr` means it does not know the leader's address.
    NotLeader { leader_id: u64, leader_addr: String },
    /// The node holds no replica for the key's shard in `keyspace`. `current` is the shard that
    /// covers the key as far as the node knows (`None` when it does not know): a descriptor for
    /// the routing cache, and replica addresses worth learning, since the configured seeds may
    /// not include them.
    /// (Boxed: a descriptor is large next to the other variants.)
    WrongShard {
        keyspace: String,
        current: Option<Box<Shard>>,
    },
    /// A transient failure (transport error, overload, timeout): try another endpoint after a
    /// backoff.
    Retry,
    /// Final: report this error to the caller.
    Fail(ClientError),
}

/// Classifies a failed attempt's status (see the module invariants).
pub(crate) fn classify(status: &Status) -> Disposition {
    let detail = ErrorDetail::from_status(status);
    if let Some(ErrorKind::NotLeader(nl)) = &detail {
        return Disposition::NotLeader {
            leader_id: nl.leader_id,
            leader_addr: nl.leader_addr.clone(),
        };
    }
    if let Some(ErrorKind::WrongShard(ws)) = detail {
        return Disposition::WrongShard {
            keyspace: ws.keyspace,
            current: ws.current.map(Box::new),
        };
    }
    match status.code() {
        // UNAVAILABLE covers both a node refusing service and tonic's own transport failures;
        // DEADLINE_EXCEEDED and CANCELLED are what a timed-out or torn-down attempt looks like;
        // RESOURCE_EXHAUSTED and ABORTED are load shedding and conflicts a later attempt avoids.
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::ResourceExhausted | Code::Aborted => {
            Disposition::Retry
        }
        // A status tonic built from a local transport failure (a connection reset mid-call, as
        // when the node is killed) carries the cause as its `source`; a status a server sent never
        // does. Retrying it is safe: reads repeat harmlessly and writes carry a session.
        Code::Unknown if std::error::Error::source(status).is_some() => Disposition::Retry,
        _ => Disposition::Fail(error_from_status(status, detail)),
    }
}

/// The non-empty replica addresses of a `WrongShard` answer's shard.
pub(crate) fn replica_addrs(current: Option<&Shard>) -> Vec<String> {
    current
        .map(|shard| {
            shard
                .replicas
                .iter()
                .map(|r| r.address.clone())
                .filter(|a| !a.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// The typed error for a status that will not be retried.
fn error_from_status(status: &Status, detail: Option<ErrorKind>) -> ClientError {
    match (status.code(), detail) {
        (_, Some(ErrorKind::InvalidArgument(ia))) => ClientError::InvalidArgument {
            field: ia.field,
            reason: ia.reason,
        },
        (Code::InvalidArgument, _) => ClientError::InvalidArgument {
            field: String::new(),
            reason: status.message().to_owned(),
        },
        (_, Some(ErrorKind::SessionExpired(_))) => ClientError::SessionExpired,
        (_, Some(ErrorKind::Corruption(c))) => ClientError::Corruption(c.what),
        (Code::DataLoss, _) => ClientError::Corruption(status.message().to_owned()),
        (code, _) => ClientError::Server {
            code,
            message: status.message().to_owned(),
        },
    }
}

/// The `last_error` for an attempt answered with `WrongShard`: if the deadline passes on it, the
/// caller learns that the request never found a node serving its shard, rather than a bare
/// "unavailable".
pub(crate) fn describe_wrong_shard(endpoint: &str, keyspace: &str, status: &Status) -> String {
    format!(
        "routing kept failing: {endpoint} holds no replica for the key in keyspace {keyspace:?} ({})",
        describe_status(status)
    )
}

/// A one-line description of a failed attempt, kept as `last_error` for `DeadlineExceeded`.
pub(crate) fn describe_status(status: &Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {}", status.code(), status.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_proto::status_with_detail;
    use basalt_proto::v1::{Corruption, InvalidArgument, NotLeader, Replica, SessionExpired, Shard, WrongShard};

    #[test]
    fn local_transport_failures_are_retried_but_server_unknowns_are_not() {
        let local = Status::from_error(Box::new(std::io::Error::other("connection reset")));
        assert_eq!(local.code(), Code::Unknown);
        assert_eq!(classify(&local), Disposition::Retry);
        let remote = Status::unknown("a server said so");
        assert!(matches!(classify(&remote), Disposition::Fail(_)));
    }

    #[test]
    fn not_leader_with_hint_is_followed() {
        let st = status_with_detail(
            "not leader",
            ErrorKind::NotLeader(NotLeader {
                leader_id: 3,
                leader_addr: "10.0.0.3:7379".into(),
            }),
        );
        assert_eq!(
            classify(&st),
            Disposition::NotLeader {
                leader_id: 3,
                leader_addr: "10.0.0.3:7379".into()
            }
        );
    }

    #[test]
    fn not_leader_during_election_carries_no_leader() {
        let st = status_with_detail(
            "election",
            ErrorKind::NotLeader(NotLeader {
                leader_id: 0,
                leader_addr: String::new(),
            }),
        );
        assert_eq!(
            classify(&st),
            Disposition::NotLeader {
                leader_id: 0,
                leader_addr: String::new()
            }
        );
    }

    #[test]
    fn wrong_shard_is_routed_around_with_the_replicas_it_names() {
        let st = status_with_detail(
            "no replica here",
            ErrorKind::WrongShard(WrongShard {
                keyspace: "orders".into(),
                current: Some(Shard {
                    id: 7,
                    replicas: vec![
                        Replica {
                            node_id: 4,
                            address: "10.0.0.4:7379".into(),
                        },
                        Replica {
                            node_id: 5,
                            address: String::new(),
                        },
                    ],
                    ..Default::default()
                }),
            }),
        );
        assert_eq!(st.code(), Code::Unavailable);
        match classify(&st) {
            Disposition::WrongShard { keyspace, current } => {
                assert_eq!(keyspace, "orders");
                assert_eq!(current.as_ref().map(|s| s.id), Some(7));
                assert_eq!(replica_addrs(current.as_deref()), ["10.0.0.4:7379"]);
            }
            other => panic!("expected WrongShard, got {other:?}"),
        }
        // Without a current shard there is nothing to learn, but it is still routed around.
        let st = status_with_detail(
            "no replica here",
            ErrorKind::WrongShard(WrongShard {
                keyspace: String::new(),
                current: None,
            }),
        );
        assert_eq!(
            classify(&st),
            Disposition::WrongShard {
                keyspace: String::new(),
                current: None
            }
        );
        assert!(replica_addrs(None).is_empty());
    }

    #[test]
    fn wrong_shard_is_retried_whatever_the_code() {
        // The pairing with UNAVAILABLE is by construction on the server, but the decision must
        // not depend on it: the detail alone says the request went to the wrong node.
        let detail = basalt_proto::v1::ErrorDetail {
            kind: Some(ErrorKind::WrongShard(WrongShard {
                keyspace: "k".into(),
                current: None,
            })),
        };
        let st = Status::with_details(
            Code::FailedPrecondition,
            "moved",
            prost::Message::encode_to_vec(&detail).into(),
        );
        assert!(
            matches!(classify(&st), Disposition::WrongShard { .. }),
            "{:?}",
            classify(&st)
        );
    }

    #[test]
    fn wrong_shard_description_says_routing_failed() {
        let line = describe_wrong_shard("a:1", "orders", &Status::unavailable("wrong shard"));
        assert_eq!(
            line,
            "routing kept failing: a:1 holds no replica for the key in keyspace \"orders\" (Unavailable: wrong shard)"
        );
    }

    #[test]
    fn transient_codes_are_retried() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Cancelled,
            Code::ResourceExhausted,
            Code::Aborted,
        ] {
            assert_eq!(classify(&Status::new(code, "x")), Disposition::Retry, "{code:?}");
        }
    }

    #[test]
    fn invalid_argument_maps_with_and_without_detail() {
        let st = status_with_detail(
            "bad",
            ErrorKind::InvalidArgument(InvalidArgument {
                field: "end".into(),
                reason: "below start".into(),
            }),
        );
        assert_eq!(
            classify(&st),
            Disposition::Fail(ClientError::InvalidArgument {
                field: "end".into(),
                reason: "below start".into()
            })
        );
        assert_eq!(
            classify(&Status::invalid_argument("key too long")),
            Disposition::Fail(ClientError::InvalidArgument {
                field: String::new(),
                reason: "key too long".into()
            })
        );
    }

    #[test]
    fn session_expired_and_corruption_are_typed() {
        let st = status_with_detail(
            "expired",
            ErrorKind::SessionExpired(SessionExpired {
                client_id: 9,
                sequence: 4,
            }),
        );
        assert_eq!(st.code(), Code::FailedPrecondition);
        assert_eq!(classify(&st), Disposition::Fail(ClientError::SessionExpired));

        let st = status_with_detail(
            "corrupt",
            ErrorKind::Corruption(Corruption {
                what: "log entry 7 checksum".into(),
            }),
        );
        assert_eq!(
            classify(&st),
            Disposition::Fail(ClientError::Corruption("log entry 7 checksum".into()))
        );
        assert_eq!(
            classify(&Status::data_loss("disk")),
            Disposition::Fail(ClientError::Corruption("disk".into()))
        );
    }

    #[test]
    fn other_codes_fail_as_server_errors() {
        for code in [
            Code::Internal,
            Code::NotFound,
            Code::PermissionDenied,
            Code::Unimplemented,
            Code::FailedPrecondition,
            Code::Unknown,
        ] {
            assert_eq!(
                classify(&Status::new(code, "m")),
                Disposition::Fail(ClientError::Server {
                    code,
                    message: "m".into()
                }),
                "{code:?}"
            );
        }
    }

    #[test]
    fn garbage_details_are_ignored() {
        let st = Status::with_details(Code::Unavailable, "x", vec![0xff, 0xff, 0xff].into());
        assert_eq!(classify(&st), Disposition::Retry);
    }

    #[test]
    fn only_pre_acceptance_errors_are_definite() {
        assert!(!ClientError::Config("x".into()).outcome_unknown());
        assert!(!ClientError::InvalidArgument {
            field: "k".into(),
            reason: "r".into()
        }
        .outcome_unknown());
        assert!(ClientError::SessionExpired.outcome_unknown());
        assert!(ClientError::DeadlineExceeded {
            after: Duration::from_secs(1),
            last_error: "x".into()
        }
        .outcome_unknown());
    }

    #[test]
    fn describe_includes_code_and_message() {
        assert_eq!(describe_status(&Status::unavailable("down")), "Unavailable: down");
        assert_eq!(describe_status(&Status::internal("")), "Internal");
    }
}
