//! How replication errors become gRPC statuses.
//!
//! The mapping is part of the public contract (see `errors.proto`): clients decide whether to
//! retry, redirect or give up from the code and detail alone.
//!
//! | error | code | retry? |
//! | --- | --- | --- |
//! | NotLeader | UNAVAILABLE + NotLeader detail | yes, at the hinted leader |
//! | QuorumUnavailable | UNAVAILABLE | yes, later |
//! | OutcomeUnknown | UNAVAILABLE | only with the same write session |
//! | UnknownMember | NOT_FOUND | no |
//! | Membership | FAILED_PRECONDITION | no |
//! | Stopped | UNAVAILABLE | elsewhere |
//! | Corrupted | DATA_LOSS + Corruption detail | elsewhere |

use basalt_consensus::ReplicationError;
use basalt_proto::v1::{Corruption, NotLeader};
use basalt_proto::{status_with_detail, ErrorKind};
use tonic::Status;

pub fn to_status(e: ReplicationError) -> Status {
    match e {
        ReplicationError::NotLeader { leader_id, leader_addr } => status_with_detail(
            e_text(leader_id, &leader_addr),
            ErrorKind::NotLeader(NotLeader {
                leader_id: leader_id.unwrap_or(0),
                leader_addr: leader_addr.unwrap_or_default(),
            }),
        ),
        ReplicationError::QuorumUnavailable(m) => Status::unavailable(format!("no quorum: {m}")),
        ReplicationError::OutcomeUnknown(m) => Status::unavailable(format!("outcome unknown: {m}")),
        ReplicationError::UnknownMember(id) => Status::not_found(format!("node {id} is not a member")),
        ReplicationError::Membership(m) => Status::failed_precondition(m),
        ReplicationError::Stopped(m) => Status::unavailable(format!("replica stopped: {m}")),
        ReplicationError::Corrupted(m) => status_with_detail(
            format!("replica stopped, corrupt data: {m}"),
            ErrorKind::Corruption(Corruption { what: m }),
        ),
        // Retryable: the leader (or this replica, once fresher) can serve it.
        e @ ReplicationError::TooStale { .. } => Status::unavailable(e.to_string()),
        ReplicationError::Storage(e) => Status::internal(format!("storage: {e}")),
    }
}

fn e_text(id: Option<u64>, addr: &Option<String>) -> String {
    match (id, addr) {
        (Some(id), Some(a)) => format!("not the leader; the leader is node {id} at {a}"),
        _ => "not the leader; no leader is known yet".to_string(),
    }
}
