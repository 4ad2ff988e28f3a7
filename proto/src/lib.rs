//! Basalt's wire contract: the `basalt.v1` protobuf package and its generated tonic code.
//!
//! The `.proto` files under `proto/basalt/v1/` are the public API for clients in every language
//! (`kv.proto`, `admin.proto`, `errors.proto`); `peer.proto` is node-to-node traffic and may change
//! between server versions. Byte fields are generated as `bytes::Bytes` so that values move through
//! the server without copies.
//!
//! Besides the generated code this crate holds the one piece of logic every user of the contract
//! needs: packing and unpacking [`v1::ErrorDetail`] in a gRPC status, so that servers and clients
//! agree on it by construction, and the [`Dialer`] through which every channel to a Basalt address
//! is opened (TCP in production, the simulated network under `basalt-sim`).

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("basalt.v1");
}

pub mod dial;
mod error_detail;
pub mod keycodec;

pub use dial::Dialer;
pub use error_detail::{status_with_detail, ErrorKind};
