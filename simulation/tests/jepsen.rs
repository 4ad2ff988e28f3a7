//! Short Jepsen-style runs in every CI run: real `basaltd` processes killed and paused (and, where
//! the machine allows network namespaces, partitioned) under a read/write/CAS workload, then the
//! checkers. The full-length run is `basalt-sim jepsen --duration 5m` (see the README).

use std::time::Duration;

use basalt_sim::history::{EventKind, Op, Value};
use basalt_sim::jepsen::{self, Faults, JepsenConfig};
use basalt_sim::linearizability::{self, CheckConfig};
use basalt_sim::History;

/// A 3-node run of `duration` with one fault every 1.5 s, judged: it must complete, make
/// progress and pass every checker.
fn run_and_check(duration: Duration, faults: Faults, seed: u64) -> jepsen::JepsenOutcome {
    let cfg = JepsenConfig {
        basaltd: basalt_bench::local_cluster::basaltd_path().expect("basaltd is built"),
        nodes: 3,
        duration,
        clients: 4,
        keys: 3,
        faults,
        fault_interval: Duration::from_millis(1500),
        seed,
    };
    let outcome = jepsen::run(&cfg).expect("the run completes");
    assert!(
        outcome.judgement.ok > 100,
        "the workload made progress: {} ok",
        outcome.judgement.ok
    );
    assert!(
        outcome.passed(),
        "linearizability: {:?}; durability: {:?}; convergence: {:?}",
        outcome.judgement.linearizability.violations(),
        outcome.judgement.durability,
        outcome.judgement.convergence
    );
    outcome
}

#[test]
fn a_short_run_with_kills_and_pauses_passes_every_checker() {
    let faults = Faults {
        kill: true,
        pause: true,
        partition: false,
    };
    let outcome = run_and_check(Duration::from_secs(8), faults, 42);
    assert!(outcome.faults.len() >= 4, "the nemesis acted: {:?}", outcome.faults);

    // The same real history with its last successful read answered with a value nobody wrote,
    // as a corrupt or confused replica would serve it, must fail: the pipeline is not vacuous.
    let events = outcome.history.events();
    let victim = events
        .iter()
        .rposition(|e| e.kind == EventKind::Ok && e.f == Op::Read)
        .expect("the run had a successful read");
    let mut planted = History::new();
    for (i, e) in events.iter().enumerate() {
        let mut e = e.clone();
        if i == victim {
            e.value = Value::Str("never-written".into());
        }
        planted.push(e);
    }
    let report = linearizability::check(&planted, &CheckConfig::default()).expect("well-formed");
    assert_eq!(report.violations().len(), 1, "{report:?}");
}

#[test]
fn a_short_run_with_partitions_passes_every_checker() {
    // Network namespaces need root and `ip`; say so rather than pass silently or fail on a
    // machine that cannot run this (the kill/pause run above still covers real processes there).
    if let Err(why) = basalt_sim::netns::available() {
        eprintln!("SKIPPED: partitions need network namespaces: {why}");
        return;
    }
    let faults = Faults {
        kill: false,
        pause: false,
        partition: true,
    };
    let outcome = run_and_check(Duration::from_secs(10), faults, 7);
    let cuts = outcome
        .faults
        .iter()
        .filter(|(_, f)| f.starts_with("partition"))
        .count();
    assert!(cuts >= 2, "the nemesis partitioned the cluster: {:?}", outcome.faults);
}
