//! Bugs the simulator can plant in a real node, to prove that its checkers catch them.
//!
//! A checker that has never caught anything proves nothing; these are classic ways a replicated
//! store loses consistency (the last two in the read modes' shortcuts), wired into the real request path so that the simulator's
//! checkers are tested against the code they normally vouch for. They are reachable only through
//! [`crate::NodeEnv::planted_bug`], which `basaltd` never sets: no flag, file or environment
//! variable turns them on.

use basalt_consensus::raft::reads::PlantedReadBug;

/// A deliberate consistency bug. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// A node that believes it leads serves reads from its local state without a ReadIndex
    /// barrier, so a deposed leader that has not noticed yet answers with stale data.
    StaleReadWithoutBarrier,
    /// The leader acknowledges a put as soon as it has handed it to Raft, before a quorum has it,
    /// so a leader that crashes or is cut off loses writes it has acknowledged.
    AckBeforeQuorum,
    /// Lease reads trust the leader's belief that it leads: no lease expiry, no wait for the
    /// previous leader's lease, no stop when handing over. A deposed leader serves stale data.
    StaleLease,
    /// Follower reads serve what the replica has applied without the leader's read index.
    FollowerWithoutReadIndex,
    /// Bounded-staleness and stale reads report the drift bound as their staleness, whatever
    /// the replica's safe time: a replica cut off from its leader claims to be fresh.
    UnderstatedStaleness,
}

impl PlantedBug {
    /// The consensus layer's part of the bug, for the bugs that live in the read path there.
    pub fn read_bug(self) -> Option<PlantedReadBug> {
        match self {
            PlantedBug::StaleLease => Some(PlantedReadBug::LeaseIgnoresOldLeader),
            PlantedBug::FollowerWithoutReadIndex => Some(PlantedReadBug::FollowerReadWithoutIndex),
            PlantedBug::UnderstatedStaleness => Some(PlantedReadBug::StalenessUnderstated),
            PlantedBug::StaleReadWithoutBarrier | PlantedBug::AckBeforeQuorum => None,
        }
    }
}

impl std::str::FromStr for PlantedBug {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stale-read" => Ok(PlantedBug::StaleReadWithoutBarrier),
            "ack-before-quorum" => Ok(PlantedBug::AckBeforeQuorum),
            "stale-lease" => Ok(PlantedBug::StaleLease),
            "follower-without-read-index" => Ok(PlantedBug::FollowerWithoutReadIndex),
            "understated-staleness" => Ok(PlantedBug::UnderstatedStaleness),
            other => Err(format!(
                "unknown planted bug {other:?} (expected stale-read, ack-before-quorum, stale-lease, \
                 follower-without-read-index or understated-staleness)"
            )),
        }
    }
}

impl std::fmt::Display for PlantedBug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PlantedBug::StaleReadWithoutBarrier => "stale-read",
            PlantedBug::AckBeforeQuorum => "ack-before-quorum",
            PlantedBug::StaleLease => "stale-lease",
            PlantedBug::FollowerWithoutReadIndex => "follower-without-read-index",
            PlantedBug::UnderstatedStaleness => "understated-staleness",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for bug in [
            PlantedBug::StaleReadWithoutBarrier,
            PlantedBug::AckBeforeQuorum,
            PlantedBug::StaleLease,
            PlantedBug::FollowerWithoutReadIndex,
            PlantedBug::UnderstatedStaleness,
        ] {
            assert_eq!(bug.to_string().parse::<PlantedBug>(), Ok(bug));
        }
        assert!("none".parse::<PlantedBug>().is_err());
    }
}
