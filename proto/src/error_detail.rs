//! Packing and unpacking machine-readable error details in a gRPC status.
//!
//! A status carries at most one encoded [`ErrorDetail`] in its `details` bytes. The status code is
//! chosen here from the detail's kind so that the pairing (for example `NotLeader` is always
//! `UNAVAILABLE`) holds everywhere by construction; clients in other languages rely on it.

use prost::Message;
use tonic::{Code, Status};

use crate::v1::{error_detail::Kind, ErrorDetail};

pub use crate::v1::error_detail::Kind as ErrorKind;

/// Builds a status whose code matches `kind` and whose details carry it encoded.
pub fn status_with_detail(message: impl Into<String>, kind: ErrorKind) -> Status {
    let code = match &kind {
        Kind::NotLeader(_) | Kind::WrongShard(_) => Code::Unavailable,
        Kind::InvalidArgument(_) => Code::InvalidArgument,
        Kind::SessionExpired(_) => Code::FailedPrecondition,
        Kind::Corruption(_) => Code::DataLoss,
    };
    let detail = ErrorDetail { kind: Some(kind) };
    Status::with_details(code, message, detail.encode_to_vec().into())
}

impl ErrorDetail {
    /// The detail carried by `status`, if it has a well-formed one.
    pub fn from_status(status: &Status) -> Option<ErrorKind> {
        if status.details().is_empty() {
            return None;
        }
        ErrorDetail::decode(status.details()).ok()?.kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::NotLeader;

    #[test]
    fn not_leader_round_trips_with_unavailable() {
        let st = status_with_detail(
            "not the leader",
            Kind::NotLeader(NotLeader {
                leader_id: 3,
                leader_addr: "127.0.0.1:7403".into(),
            }),
        );
        assert_eq!(st.code(), Code::Unavailable);
        match ErrorDetail::from_status(&st) {
            Some(Kind::NotLeader(nl)) => {
                assert_eq!(nl.leader_id, 3);
                assert_eq!(nl.leader_addr, "127.0.0.1:7403");
            }
            other => panic!("unexpected detail {other:?}"),
        }
    }

    #[test]
    fn status_without_details_has_none() {
        assert!(ErrorDetail::from_status(&Status::internal("x")).is_none());
    }
}
