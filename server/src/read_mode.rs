//! Read modes at the API edge: which mode a `Get` or `Scan` asks for (the request's, else its
//! keyspace's default, else `linearizable`), validated, and how the answer reports the mode that
//! served it. What each mode *does* lives in the consensus layer
//! (`basalt_consensus::raft::reads`); `docs/read-modes.md` is the user's contract.
//!
//! Invariant: a bad `ReadOptions` (an unknown mode, a bound on a mode that takes none, a
//! bounded-staleness read without a bound) is refused with `InvalidArgument` before anything is
//! read; it never silently becomes another mode.

use std::time::Duration;

use basalt_consensus::{ReadGrant, ReadMode, Staleness};
use basalt_proto::v1::{ReadInfo, ReadMode as PbMode, ReadOptions};
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::limits::invalid;

/// The largest bound a bounded-staleness read may ask for: a day. A larger one is almost
/// certainly a unit mistake (microseconds for milliseconds), and `stale` says "any age" plainly.
pub const MAX_STALENESS_BOUND: Duration = Duration::from_secs(86_400);

/// A keyspace's default read mode, as the catalog stores it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DefaultRead {
    #[default]
    Linearizable,
    Lease,
    Follower,
    BoundedStaleness {
        max_ms: u64,
    },
    Stale,
}

impl DefaultRead {
    pub fn mode(self) -> ReadMode {
        match self {
            DefaultRead::Linearizable => ReadMode::Linearizable,
            DefaultRead::Lease => ReadMode::Lease,
            DefaultRead::Follower => ReadMode::Follower,
            DefaultRead::BoundedStaleness { max_ms } => ReadMode::BoundedStaleness(Duration::from_millis(max_ms)),
            DefaultRead::Stale => ReadMode::Stale,
        }
    }

    /// The keyspace default a `CreateKeyspace` asks for; absent or unspecified: linearizable.
    pub fn from_pb(o: Option<&ReadOptions>, field: &str) -> Result<Self, Status> {
        Ok(match requested(o, field)? {
            None | Some(ReadMode::Linearizable) => DefaultRead::Linearizable,
            Some(ReadMode::Lease) => DefaultRead::Lease,
            Some(ReadMode::Follower) => DefaultRead::Follower,
            Some(ReadMode::BoundedStaleness(d)) => DefaultRead::BoundedStaleness {
                max_ms: d.as_millis() as u64,
            },
            Some(ReadMode::Stale) => DefaultRead::Stale,
        })
    }

    pub fn to_pb(self) -> ReadOptions {
        match self.mode() {
            ReadMode::BoundedStaleness(d) => ReadOptions {
                mode: PbMode::BoundedStaleness as i32,
                max_staleness_ms: d.as_millis() as u64,
            },
            m => ReadOptions {
                mode: pb_mode(m) as i32,
                max_staleness_ms: 0,
            },
        }
    }
}

/// The mode `o` asks for, or `None` for "the keyspace's default"; `field` names the options in
/// errors.
pub fn requested(o: Option<&ReadOptions>, field: &str) -> Result<Option<ReadMode>, Status> {
    let Some(o) = o else { return Ok(None) };
    let mode = PbMode::try_from(o.mode)
        .map_err(|_| invalid(&format!("{field}.mode"), format!("unknown read mode {}", o.mode)))?;
    let bound = Duration::from_millis(o.max_staleness_ms);
    if mode != PbMode::BoundedStaleness && o.max_staleness_ms != 0 {
        return Err(invalid(
            &format!("{field}.max_staleness_ms"),
            "only a bounded_staleness read takes a bound",
        ));
    }
    Ok(Some(match mode {
        PbMode::Unspecified => return Ok(None),
        PbMode::Linearizable => ReadMode::Linearizable,
        PbMode::Lease => ReadMode::Lease,
        PbMode::Follower => ReadMode::Follower,
        PbMode::Stale => ReadMode::Stale,
        PbMode::BoundedStaleness if o.max_staleness_ms == 0 => {
            return Err(invalid(
                &format!("{field}.max_staleness_ms"),
                "a bounded_staleness read needs a bound above 0 ms",
            ))
        }
        PbMode::BoundedStaleness if bound > MAX_STALENESS_BOUND => {
            return Err(invalid(
                &format!("{field}.max_staleness_ms"),
                format!(
                    "{} ms is over the largest bound, {} ms (use the stale mode for any age)",
                    o.max_staleness_ms,
                    MAX_STALENESS_BOUND.as_millis()
                ),
            ))
        }
        PbMode::BoundedStaleness => ReadMode::BoundedStaleness(bound),
    }))
}

fn pb_mode(m: ReadMode) -> PbMode {
    match m {
        ReadMode::Linearizable => PbMode::Linearizable,
        ReadMode::Lease => PbMode::Lease,
        ReadMode::Follower => PbMode::Follower,
        ReadMode::BoundedStaleness(_) => PbMode::BoundedStaleness,
        ReadMode::Stale => PbMode::Stale,
    }
}

/// What a response says about how its read was served, by node `node_id`.
pub fn read_info(grant: &ReadGrant, node_id: u64) -> ReadInfo {
    let (staleness_bound_ms, staleness_unknown) = match grant.staleness {
        Staleness::Fresh => (0, false),
        // Rounded up: the bound must not understate.
        Staleness::AtMost(d) => (d.as_micros().div_ceil(1000) as u64, false),
        Staleness::Unknown => (0, true),
    };
    ReadInfo {
        mode: pb_mode(grant.mode) as i32,
        node_id,
        applied_index: grant.applied_index,
        staleness_bound_ms,
        staleness_unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(mode: PbMode, max: u64) -> ReadOptions {
        ReadOptions {
            mode: mode as i32,
            max_staleness_ms: max,
        }
    }

    #[test]
    fn modes_map_and_bad_options_are_refused() {
        assert_eq!(requested(None, "read").unwrap(), None);
        assert_eq!(requested(Some(&opts(PbMode::Unspecified, 0)), "read").unwrap(), None);
        assert_eq!(
            requested(Some(&opts(PbMode::Lease, 0)), "read").unwrap(),
            Some(ReadMode::Lease)
        );
        assert_eq!(
            requested(Some(&opts(PbMode::BoundedStaleness, 250)), "read").unwrap(),
            Some(ReadMode::BoundedStaleness(Duration::from_millis(250)))
        );
        for bad in [
            opts(PbMode::BoundedStaleness, 0),
            opts(PbMode::BoundedStaleness, 86_400_001),
            opts(PbMode::Stale, 5),
            ReadOptions {
                mode: 42,
                max_staleness_ms: 0,
            },
        ] {
            let e = requested(Some(&bad), "read").unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}: {e}");
        }
    }

    #[test]
    fn keyspace_defaults_round_trip() {
        for d in [
            DefaultRead::Linearizable,
            DefaultRead::Lease,
            DefaultRead::Follower,
            DefaultRead::BoundedStaleness { max_ms: 1500 },
            DefaultRead::Stale,
        ] {
            assert_eq!(DefaultRead::from_pb(Some(&d.to_pb()), "default_read").unwrap(), d);
        }
        assert_eq!(DefaultRead::from_pb(None, "d").unwrap(), DefaultRead::Linearizable);
    }

    #[test]
    fn a_staleness_bound_is_rounded_up_to_the_millisecond() {
        let g = ReadGrant {
            mode: ReadMode::Stale,
            applied_index: 7,
            staleness: Staleness::AtMost(Duration::from_micros(1_001)),
        };
        let info = read_info(&g, 3);
        assert_eq!((info.staleness_bound_ms, info.node_id, info.applied_index), (2, 3, 7));
        assert_eq!(info.mode, PbMode::Stale as i32);
    }
}
