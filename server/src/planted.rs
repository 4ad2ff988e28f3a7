//! Bugs the simulator can plant in a real node, to prove that its checkers catch them.
//!
//! A checker that has never caught anything proves nothing; these are the two classic ways a
//! replicated store loses consistency, wired into the real request path so that the simulator's
//! checkers are tested against the code they normally vouch for. They are reachable only through
//! [`crate::NodeEnv::planted_bug`], which `basaltd` never sets: no flag, file or environment
//! variable turns them on.

/// A deliberate consistency bug. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// A node that believes it leads serves reads from its local state without a ReadIndex
    /// barrier, so a deposed leader that has not noticed yet answers with stale data.
    StaleReadWithoutBarrier,
    /// The leader acknowledges a put as soon as it has handed it to Raft, before a quorum has it,
    /// so a leader that crashes or is cut off loses writes it has acknowledged.
    AckBeforeQuorum,
}

impl std::str::FromStr for PlantedBug {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stale-read" => Ok(PlantedBug::StaleReadWithoutBarrier),
            "ack-before-quorum" => Ok(PlantedBug::AckBeforeQuorum),
            other => Err(format!(
                "unknown planted bug {other:?} (expected stale-read or ack-before-quorum)"
            )),
        }
    }
}

impl std::fmt::Display for PlantedBug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PlantedBug::StaleReadWithoutBarrier => "stale-read",
            PlantedBug::AckBeforeQuorum => "ack-before-quorum",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for bug in [PlantedBug::StaleReadWithoutBarrier, PlantedBug::AckBeforeQuorum] {
            assert_eq!(bug.to_string().parse::<PlantedBug>(), Ok(bug));
        }
        assert!("none".parse::<PlantedBug>().is_err());
    }
}
