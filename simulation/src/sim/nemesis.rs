//! The simulator's nemesis: which faults a run injects, and when, derived from its seed.
//!
//! The schedule is computed before the run starts from a generator of its own (seeded from the run's
//! seed), so turning one fault kind off does not shift the timing of the simulation's other random
//! choices, and a failing run's faults can be read before replaying it.
//!
//! Process and network faults come one at a time, each healed before the next: a majority can
//! always make progress once the fault heals, so a run tests safety under every fault and
//! availability between them. Membership changes run beside them on their own schedule (a node is
//! removed, later added back) through the real Admin API, from a simulated operator host.
//!
//! What each kind models, and its limits:
//! - `partition`: majority/minority splits, an isolated leader (whichever node leads when the
//!   fault starts) and, with five nodes, a bridge (two halves that each see one middle node).
//!   Only node-to-node links are cut; clients reach every node, so a client may be talking to the
//!   minority side, as happens in practice.
//! - `loss`: links fail at random for a tick at a time; everything in flight on them is dropped.
//!   TCP segments are not retransmitted by turmoil, so a loss breaks the connection and the
//!   transport must reconnect and retry, which duplicates requests at the RPC level.
//! - `delay`: message latency up to a few hundred milliseconds, so messages on different
//!   connections overtake each other (reordering).
//! - `crash`: the node's process dies and its in-memory disk loses every write not yet fsynced;
//!   it restarts when the fault heals.
//! - `pause`: every link of the node holds its messages, then delivers them all at once: the
//!   network-visible effect of a stopped process. (Its timers keep running, unlike a SIGSTOP; the
//!   Jepsen runner covers real SIGSTOP.)
//! - `skew`: each node's clock runs at its own rate, 0.75x to 1.33x: its heartbeat and election
//!   timers scale accordingly, and its wall clock (closed timestamps) is offset by up to half
//!   the drift bound. With lease reads in the workload the rates are narrowed to 0.92x–1.08x, the
//!   skew the configured drift bound covers (see `sim::within_drift_bound`).
//! - `membership`: remove a node from the group under load, then add it back.
//! - `topology`: the workload runs on a range keyspace of its own (3 replicas) whose shards an
//!   operator splits (at a workload key, so the keys really move), merges with their right
//!   neighbours, moves to a node without a replica (with more than 3 nodes) and hands between
//!   leaders, through the real Admin API, on a schedule of its own beside the other faults. The
//!   placement driver runs too. A topology change that fails (a fault is in force, the shard just
//!   changed) is logged and the next one goes on.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Which fault kinds a run may inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Faults {
    pub partition: bool,
    pub loss: bool,
    pub delay: bool,
    pub crash: bool,
    pub pause: bool,
    pub skew: bool,
    pub membership: bool,
    pub topology: bool,
}

const KINDS: [&str; 8] = [
    "partition",
    "loss",
    "delay",
    "crash",
    "pause",
    "skew",
    "membership",
    "topology",
];

impl Faults {
    pub fn all() -> Self {
        Self {
            partition: true,
            loss: true,
            delay: true,
            crash: true,
            pause: true,
            skew: true,
            membership: true,
            topology: true,
        }
    }

    pub fn none() -> Self {
        Self::default()
    }

    fn flags(&self) -> [bool; 8] {
        [
            self.partition,
            self.loss,
            self.delay,
            self.crash,
            self.pause,
            self.skew,
            self.membership,
            self.topology,
        ]
    }

    fn flag_mut(&mut self, name: &str) -> Option<&mut bool> {
        Some(match name {
            "partition" => &mut self.partition,
            "loss" => &mut self.loss,
            "delay" => &mut self.delay,
            "crash" => &mut self.crash,
            "pause" => &mut self.pause,
            "skew" => &mut self.skew,
            "membership" => &mut self.membership,
            "topology" => &mut self.topology,
            _ => return None,
        })
    }
}

impl FromStr for Faults {
    type Err = String;

    /// `all`, `none`, or a comma-separated list of kinds.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "all" => return Ok(Self::all()),
            "none" | "" => return Ok(Self::none()),
            _ => {}
        }
        let mut faults = Self::none();
        for name in s.split(',').map(str::trim) {
            *faults.flag_mut(name).ok_or_else(|| {
                format!(
                    "unknown fault kind {name:?} (expected all, none, or a list of {})",
                    KINDS.join(", ")
                )
            })? = true;
        }
        Ok(faults)
    }
}

impl fmt::Display for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on: Vec<&str> = KINDS
            .iter()
            .zip(self.flags())
            .filter(|(_, on)| *on)
            .map(|(k, _)| *k)
            .collect();
        match on.len() {
            0 => f.write_str("none"),
            8 => f.write_str("all"),
            _ => f.write_str(&on.join(",")),
        }
    }
}

/// How a partition divides the nodes (node ids are 1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Split {
    /// The two sides; every link between them is cut.
    Sides(Vec<u64>, Vec<u64>),
    /// Whichever node leads when the fault starts, alone against the rest.
    IsolateLeader,
    /// Only these node pairs are cut.
    Links(Vec<(u64, u64)>),
}

impl Split {
    /// A partition drawn from `rng`: an isolated leader, a majority/minority split or (with five
    /// nodes or more) a bridge. The Jepsen runner draws its partitions here too.
    pub fn random(rng: &mut StdRng, ids: &[u64]) -> Split {
        split(rng, ids)
    }

    /// The node pairs to cut, given which node leads now (for [`Split::IsolateLeader`]).
    pub fn pairs(&self, ids: &[u64], leader: u64) -> Vec<(u64, u64)> {
        match self {
            Split::Sides(a, b) => a.iter().flat_map(|&x| b.iter().map(move |&y| (x, y))).collect(),
            Split::Links(pairs) => pairs.clone(),
            Split::IsolateLeader => ids.iter().filter(|&&o| o != leader).map(|&o| (leader, o)).collect(),
        }
    }
}

/// One process or network fault; it lasts until its scheduled heal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    Partition(Split),
    Loss { fail_rate_per_mille: u32 },
    Delay { max_latency: Duration },
    Crash { node: u64 },
    Pause { node: u64 },
}

/// A fault with its start and end, in simulated time since the run began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduled {
    pub start: Duration,
    pub end: Duration,
    pub fault: Fault,
}

/// A membership change pair: remove `node` at `remove`, add it back at `add`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipChange {
    pub node: u64,
    pub remove: Duration,
    pub add: Duration,
}

/// A change to the workload keyspace's shards (the `topology` kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopologyAction {
    /// Split a shard at one of the workload's keys inside it.
    Split,
    /// Merge a shard with its right neighbour.
    Merge,
    /// Move one replica of a shard to a node without one.
    Move,
    /// Hand a shard's leadership to another of its replicas.
    TransferLeader,
}

/// One topology change: `action` at `at`; `pick` chooses the shard, key and nodes among those
/// that exist when it runs, so the choice depends only on the seed and the cluster's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopologyChange {
    pub at: Duration,
    pub action: TopologyAction,
    pub pick: u64,
}

/// Everything the nemesis will do in one run.
#[derive(Debug, Clone, Default)]
pub struct Schedule {
    pub faults: Vec<Scheduled>,
    pub membership: Vec<MembershipChange>,
    pub topology: Vec<TopologyChange>,
    /// Each node's clock rate in thousandths (1000 = true time), by node id - 1.
    pub clock_rates: Vec<u32>,
}

/// No fault starts before the first leader is elected, nor in the last second of the workload.
const QUIET_START: Duration = Duration::from_secs(2);

impl Schedule {
    pub fn generate(seed: u64, faults: &Faults, nodes: usize, workload: Duration) -> Self {
        let mut rng = StdRng::seed_from_u64(seed.rotate_left(29) ^ 0x00DD_BA11_F00D);
        let ids: Vec<u64> = (1..=nodes as u64).collect();
        let clock_rates = ids
            .iter()
            .map(|_| {
                if faults.skew {
                    rng.random_range(750..=1333)
                } else {
                    1000
                }
            })
            .collect();
        let last = workload.saturating_sub(Duration::from_secs(1));

        let mut kinds: Vec<&str> = Vec::new();
        for (kind, on) in [
            ("partition", faults.partition),
            ("loss", faults.loss),
            ("delay", faults.delay),
            ("crash", faults.crash),
            ("pause", faults.pause),
        ] {
            if on {
                kinds.push(kind);
            }
        }
        let mut scheduled = Vec::new();
        let mut t = QUIET_START + ms(&mut rng, 0, 1000);
        while !kinds.is_empty() && t < last {
            let end = (t + ms(&mut rng, 500, 3000)).min(last);
            let node = ids[rng.random_range(0..ids.len())];
            let fault = match kinds[rng.random_range(0..kinds.len())] {
                "partition" => Fault::Partition(split(&mut rng, &ids)),
                "loss" => Fault::Loss {
                    fail_rate_per_mille: rng.random_range(2..=20),
                },
                "delay" => Fault::Delay {
                    max_latency: ms(&mut rng, 20, 300),
                },
                "crash" => Fault::Crash { node },
                _ => Fault::Pause { node },
            };
            scheduled.push(Scheduled { start: t, end, fault });
            t = end + ms(&mut rng, 300, 1500);
        }

        let mut membership = Vec::new();
        if faults.membership {
            let mut t = QUIET_START + ms(&mut rng, 500, 3000);
            while t < last {
                let add = t + ms(&mut rng, 1000, 3000);
                let node = ids[rng.random_range(0..ids.len())];
                membership.push(MembershipChange { node, remove: t, add });
                t = add + ms(&mut rng, 2000, 5000);
            }
        }
        // A generator of its own, so turning topology changes on leaves the other schedules as
        // they were for the seed.
        let mut topology = Vec::new();
        if faults.topology {
            let mut rng = StdRng::seed_from_u64(seed.rotate_left(17) ^ 0x0070_B010_6111);
            let mut t = QUIET_START + ms(&mut rng, 0, 1000);
            while t < last {
                // Splits are the most frequent, so there are shards to merge, move and transfer.
                let action = match rng.random_range(0..10) {
                    0..=3 => TopologyAction::Split,
                    4..=5 => TopologyAction::Merge,
                    6..=7 => TopologyAction::Move,
                    _ => TopologyAction::TransferLeader,
                };
                topology.push(TopologyChange {
                    at: t,
                    action,
                    pick: rng.random(),
                });
                t += ms(&mut rng, 400, 1500);
            }
        }
        Self {
            faults: scheduled,
            membership,
            topology,
            clock_rates,
        }
    }
}

fn ms(rng: &mut StdRng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.random_range(lo..=hi))
}

fn split(rng: &mut StdRng, ids: &[u64]) -> Split {
    let n = ids.len();
    match rng.random_range(0..3) {
        0 => Split::IsolateLeader,
        1 if n >= 5 => {
            // A bridge: {a, b} and {d, e} cannot talk, but both talk to c.
            let mut order = ids.to_vec();
            shuffle(rng, &mut order);
            let (left, right) = (&order[..2], &order[3..5]);
            Split::Links(left.iter().flat_map(|&a| right.iter().map(move |&b| (a, b))).collect())
        }
        _ => {
            let mut order = ids.to_vec();
            shuffle(rng, &mut order);
            let minority = order.split_off(n / 2 + 1);
            Split::Sides(order, minority)
        }
    }
}

/// Fisher–Yates with the schedule's own generator (so the result depends only on the seed).
fn shuffle(rng: &mut StdRng, v: &mut [u64]) {
    for i in (1..v.len()).rev() {
        let j = rng.random_range(0..=i);
        v.swap(i, j);
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Partition(Split::Sides(a, b)) => write!(f, "partition {a:?} | {b:?}"),
            Fault::Partition(Split::IsolateLeader) => f.write_str("partition: isolate the leader"),
            Fault::Partition(Split::Links(pairs)) => write!(f, "partition (bridge) cutting {pairs:?}"),
            Fault::Loss { fail_rate_per_mille } => {
                write!(f, "message loss: links fail {fail_rate_per_mille}/1000 per tick")
            }
            Fault::Delay { max_latency } => write!(f, "delay: latency up to {max_latency:?}"),
            Fault::Crash { node } => write!(f, "crash node {node} (unsynced writes lost)"),
            Fault::Pause { node } => write!(f, "pause node {node} (its links hold messages)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_lists_parse_and_print() {
        assert_eq!("all".parse::<Faults>().unwrap(), Faults::all());
        assert_eq!("none".parse::<Faults>().unwrap(), Faults::none());
        let f: Faults = "crash, partition".parse().unwrap();
        assert!(f.crash && f.partition && !f.loss);
        assert_eq!(f.to_string(), "partition,crash");
        assert!("crash,fire".parse::<Faults>().unwrap_err().contains("fire"));
    }

    #[test]
    fn a_schedule_depends_only_on_the_seed_and_respects_its_bounds() {
        let a = Schedule::generate(9, &Faults::all(), 5, Duration::from_secs(30));
        let b = Schedule::generate(9, &Faults::all(), 5, Duration::from_secs(30));
        assert_eq!(a.faults, b.faults);
        assert_eq!(a.membership, b.membership);
        assert!(!a.faults.is_empty() && !a.membership.is_empty());
        for w in a.faults.windows(2) {
            assert!(w[0].end < w[1].start, "one fault at a time: {w:?}");
        }
        for s in &a.faults {
            assert!(s.start >= QUIET_START && s.end <= Duration::from_secs(29));
        }
        assert!(a.clock_rates.iter().all(|r| (750..=1333).contains(r)));
        let none = Schedule::generate(9, &Faults::none(), 3, Duration::from_secs(30));
        assert!(none.faults.is_empty() && none.membership.is_empty() && none.topology.is_empty());
        assert!(!a.topology.is_empty());
        // Topology changes come from a generator of their own: the other schedules do not move.
        let mut without = Faults::all();
        without.topology = false;
        let c = Schedule::generate(9, &without, 5, Duration::from_secs(30));
        assert_eq!(a.faults, c.faults);
        assert_eq!(a.membership, c.membership);
        assert!(c.topology.is_empty());
        assert!(none.clock_rates.iter().all(|&r| r == 1000));
    }

    #[test]
    fn minority_sides_are_minorities() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..200 {
            if let Split::Sides(major, minor) = split(&mut rng, &[1, 2, 3, 4, 5]) {
                assert_eq!((major.len(), minor.len()), (3, 2));
            }
        }
    }
}
