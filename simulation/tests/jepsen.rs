//! A short Jepsen-style run in every CI run: real `basaltd` processes killed and paused under a
//! read/write/CAS workload, then the checkers. The full-length run is `basalt-sim jepsen
//! --duration 5m` (see the README).

use std::time::Duration;

use basalt_sim::history::{EventKind, Op, Value};
use basalt_sim::jepsen::{self, Faults, JepsenConfig};
use basalt_sim::linearizability::{self, CheckConfig};
use basalt_sim::History;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_run_with_kills_and_pauses_passes_every_checker() {
    let cfg = JepsenConfig {
        basaltd: basalt_bench::local_cluster::basaltd_path().expect("basaltd is built"),
        nodes: 3,
        duration: Duration::from_secs(8),
        clients: 4,
        keys: 3,
        faults: Faults {
            kill: true,
            pause: true,
        },
        fault_interval: Duration::from_millis(1500),
        seed: 42,
    };
    let outcome = jepsen::run(&cfg).await.expect("the run completes");
    assert!(outcome.faults.len() >= 4, "the nemesis acted: {:?}", outcome.faults);
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
