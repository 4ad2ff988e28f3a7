//! Read modes as the client library and `basaltctl` name them, and what a response says about how
//! its read was served. `docs/read-modes.md` has the table of guarantees.
//!
//! A mode is chosen per handle ([`crate::Client::with_read_mode`]), with the client's default in
//! [`crate::ClientConfig::read_mode`]; [`ReadMode::KeyspaceDefault`] leaves the choice to the
//! keyspace (whose own default is `linearizable`). Parsing is strict: `bounded` needs a bound
//! above zero, and nothing else takes one.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use basalt_proto::v1::{ReadInfo, ReadMode as PbMode, ReadOptions};

use crate::cli::duration::parse_duration;

/// How a read trades consistency for latency and availability.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReadMode {
    /// Whatever the keyspace's default is (`linearizable` unless it was created with another).
    #[default]
    KeyspaceDefault,
    /// The leader after a ReadIndex quorum round.
    Linearizable,
    /// The leader inside its lease, no round trip (linearizable while clocks stay within the
    /// cluster's `--max-clock-drift`).
    Lease,
    /// Any replica, once it has applied the leader's read index: linearizable, off the leader.
    Follower,
    /// Any replica that can prove its data is at most this old.
    BoundedStaleness(Duration),
    /// Any replica, however old its data; the answer says how old it may be.
    Stale,
}

impl ReadMode {
    /// The options a request carries; `None` for the keyspace's default.
    pub(crate) fn to_pb(self) -> Option<ReadOptions> {
        let (mode, max) = match self {
            ReadMode::KeyspaceDefault => return None,
            ReadMode::Linearizable => (PbMode::Linearizable, 0),
            ReadMode::Lease => (PbMode::Lease, 0),
            ReadMode::Follower => (PbMode::Follower, 0),
            // Rounded up to whole milliseconds: a bound must not shrink on the way.
            ReadMode::BoundedStaleness(d) => (PbMode::BoundedStaleness, d.as_micros().div_ceil(1000) as u64),
            ReadMode::Stale => (PbMode::Stale, 0),
        };
        Some(ReadOptions {
            mode: mode as i32,
            max_staleness_ms: max,
        })
    }

    /// Whether the mode promises linearizable reads (`KeyspaceDefault` counts as linearizable:
    /// it is, unless the keyspace was created with another default).
    pub fn linearizable(self) -> bool {
        !matches!(self, ReadMode::BoundedStaleness(_) | ReadMode::Stale)
    }

    /// Whether any replica may serve the read, so the client should spread such reads over the
    /// shard's replicas instead of sending them to its leader.
    pub(crate) fn any_replica(self) -> bool {
        matches!(
            self,
            ReadMode::Follower | ReadMode::BoundedStaleness(_) | ReadMode::Stale
        )
    }

    /// The mode a response reports, if it is one this client knows.
    fn from_info(info: &ReadInfo) -> ReadMode {
        match PbMode::try_from(info.mode) {
            Ok(PbMode::Linearizable) => ReadMode::Linearizable,
            Ok(PbMode::Lease) => ReadMode::Lease,
            Ok(PbMode::Follower) => ReadMode::Follower,
            Ok(PbMode::BoundedStaleness) => ReadMode::BoundedStaleness(Duration::ZERO),
            Ok(PbMode::Stale) => ReadMode::Stale,
            Ok(PbMode::Unspecified) | Err(_) => ReadMode::KeyspaceDefault,
        }
    }
}

impl fmt::Display for ReadMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadMode::KeyspaceDefault => f.write_str("default"),
            ReadMode::Linearizable => f.write_str("linearizable"),
            ReadMode::Lease => f.write_str("lease"),
            ReadMode::Follower => f.write_str("follower"),
            ReadMode::BoundedStaleness(d) if d.is_zero() => f.write_str("bounded_staleness"),
            ReadMode::BoundedStaleness(d) => write!(f, "bounded_staleness:{}ms", d.as_millis()),
            ReadMode::Stale => f.write_str("stale"),
        }
    }
}

impl FromStr for ReadMode {
    type Err = String;

    /// `default`, `linearizable`, `lease`, `follower`, `stale`, or `bounded:DURATION` (also
    /// `bounded_staleness:DURATION`), for example `bounded:500ms`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some((name, bound)) = s.split_once(':') {
            if name != "bounded" && name != "bounded_staleness" && name != "bounded-staleness" {
                return Err(format!("{name:?} takes no bound; only bounded:DURATION does"));
            }
            let d = parse_duration(bound)?;
            if d.is_zero() {
                return Err("a bounded read needs a bound above zero".into());
            }
            return Ok(ReadMode::BoundedStaleness(d));
        }
        match s {
            "default" => Ok(ReadMode::KeyspaceDefault),
            "linearizable" => Ok(ReadMode::Linearizable),
            "lease" => Ok(ReadMode::Lease),
            "follower" => Ok(ReadMode::Follower),
            "stale" => Ok(ReadMode::Stale),
            "bounded" | "bounded_staleness" | "bounded-staleness" => {
                Err("a bounded read needs its bound: bounded:DURATION, for example bounded:500ms".into())
            }
            other => Err(format!(
                "unknown read mode {other:?} (expected linearizable, lease, follower, bounded:DURATION, stale or \
                 default)"
            )),
        }
    }
}

/// A keyspace's default read mode as `keyspace list` shows it (`linearizable` when unset, as
/// the server treats it), for example `bounded_staleness:2000ms`.
pub(crate) fn default_mode_name(o: Option<&ReadOptions>) -> String {
    let mode = match o.map(|o| (PbMode::try_from(o.mode), o.max_staleness_ms)) {
        None | Some((Ok(PbMode::Unspecified | PbMode::Linearizable), _)) => ReadMode::Linearizable,
        Some((Ok(PbMode::Lease), _)) => ReadMode::Lease,
        Some((Ok(PbMode::Follower), _)) => ReadMode::Follower,
        Some((Ok(PbMode::BoundedStaleness), ms)) => ReadMode::BoundedStaleness(Duration::from_millis(ms)),
        Some((Ok(PbMode::Stale), _)) => ReadMode::Stale,
        Some((Err(_), _)) => return "unknown".into(),
    };
    mode.to_string()
}

/// How a read was served, as its response says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServedRead {
    /// The mode that served it: the one asked for or a stronger one (a lease read outside a valid
    /// lease is served as `linearizable`). A bounded read's bound is not echoed: `Duration::ZERO`.
    pub mode: ReadMode,
    /// The node whose replica was read.
    pub node_id: u64,
    /// That replica's applied log index.
    pub applied_index: u64,
    /// For `bounded_staleness` and `stale`: how old the answer may be at most. `None` for the
    /// linearizable modes, and for a stale read on a replica that has no safe time yet
    /// (`staleness_unknown`).
    pub staleness: Option<Duration>,
    /// A stale read whose replica could not bound its staleness.
    pub staleness_unknown: bool,
}

impl ServedRead {
    pub(crate) fn from_pb(info: &ReadInfo) -> Self {
        let mode = ReadMode::from_info(info);
        let bounded = matches!(mode, ReadMode::BoundedStaleness(_) | ReadMode::Stale) && !info.staleness_unknown;
        Self {
            mode,
            node_id: info.node_id,
            applied_index: info.applied_index,
            staleness: bounded.then(|| Duration::from_millis(info.staleness_bound_ms)),
            staleness_unknown: info.staleness_unknown,
        }
    }
}

/// Of two reads (the pages of one scan), the one whose answer may be the older: an unknown
/// staleness first, then the larger bound; on a tie, `next`.
pub(crate) fn older(current: Option<ServedRead>, next: ServedRead) -> ServedRead {
    let age = |s: &ServedRead| (s.staleness_unknown, s.staleness);
    match current {
        Some(c) if age(&c) > age(&next) => c,
        _ => next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for (text, mode) in [
            ("linearizable", ReadMode::Linearizable),
            ("lease", ReadMode::Lease),
            ("follower", ReadMode::Follower),
            ("stale", ReadMode::Stale),
            ("default", ReadMode::KeyspaceDefault),
            ("bounded:500ms", ReadMode::BoundedStaleness(Duration::from_millis(500))),
            (
                "bounded_staleness:2s",
                ReadMode::BoundedStaleness(Duration::from_secs(2)),
            ),
        ] {
            assert_eq!(text.parse::<ReadMode>(), Ok(mode), "{text}");
        }
        assert_eq!(
            ReadMode::BoundedStaleness(Duration::from_secs(2)).to_string(),
            "bounded_staleness:2000ms"
        );
        for bad in ["bounded", "bounded:0s", "stale:1s", "eventual", "bounded:soon"] {
            assert!(bad.parse::<ReadMode>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bound_is_sent_in_whole_milliseconds_rounded_up() {
        let o = ReadMode::BoundedStaleness(Duration::from_micros(1_500))
            .to_pb()
            .unwrap();
        assert_eq!((o.mode, o.max_staleness_ms), (PbMode::BoundedStaleness as i32, 2));
        assert_eq!(ReadMode::KeyspaceDefault.to_pb(), None);
    }

    #[test]
    fn of_two_pages_the_older_answer_is_kept() {
        let page = |ms: Option<u64>, unknown| ServedRead {
            mode: ReadMode::Stale,
            node_id: 1,
            applied_index: 1,
            staleness: ms.map(Duration::from_millis),
            staleness_unknown: unknown,
        };
        assert_eq!(
            older(Some(page(Some(50), false)), page(Some(20), false)),
            page(Some(50), false)
        );
        assert_eq!(older(Some(page(Some(50), false)), page(None, true)), page(None, true));
        assert_eq!(older(None, page(Some(5), false)), page(Some(5), false));
    }

    #[test]
    fn a_served_read_reports_staleness_only_where_it_has_one() {
        let info = |mode: PbMode, ms, unknown| ReadInfo {
            mode: mode as i32,
            node_id: 2,
            applied_index: 9,
            staleness_bound_ms: ms,
            staleness_unknown: unknown,
        };
        assert_eq!(
            ServedRead::from_pb(&info(PbMode::Linearizable, 0, false)).staleness,
            None
        );
        assert_eq!(
            ServedRead::from_pb(&info(PbMode::Stale, 120, false)).staleness,
            Some(Duration::from_millis(120))
        );
        let unknown = ServedRead::from_pb(&info(PbMode::Stale, 0, true));
        assert_eq!((unknown.staleness, unknown.staleness_unknown), (None, true));
    }
}
