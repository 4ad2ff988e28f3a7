//! `basalt-sim`: run the Jepsen-style test against real `basaltd` processes, or check a
//! recorded history.
//!
//! Exit status: 0 when every checker passed, 1 when one found a violation, 2 on a usage or
//! set-up error (the run could not be judged).

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use basalt_client::cli::duration::parse_duration;
use basalt_sim::jepsen::{self, Faults, JepsenConfig};
use basalt_sim::linearizability::{self, CheckConfig, Verdict};
use basalt_sim::History;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "basalt-sim", version, about = "Basalt's simulation and Jepsen-style testing")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local cluster of real basaltd processes, run a read/write/CAS workload while
    /// killing and pausing nodes, then check the history.
    Jepsen(JepsenArgs),
    /// Check a history written as JSON lines (by `jepsen --history` or another tool) for
    /// per-key linearizability.
    Check {
        history: PathBuf,
        /// Search steps per key before its verdict is "unknown".
        #[arg(long, default_value_t = CheckConfig::default().max_steps_per_key)]
        max_steps: u64,
    },
}

#[derive(clap::Args)]
struct JepsenArgs {
    /// Nodes in the cluster (at least 3, so one can fail).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// How long the workload and the faults run.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Concurrent client processes.
    #[arg(long, default_value_t = 5)]
    clients: usize,
    /// Distinct keys the clients share (few, so operations conflict).
    #[arg(long, default_value_t = 5)]
    keys: usize,
    /// Comma-separated faults: kill, pause (or none).
    #[arg(long, default_value = "kill,pause")]
    faults: String,
    /// Time between faults; each fault lasts this long.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    fault_interval: Duration,
    /// Default: random (printed, so a run can be repeated).
    #[arg(long)]
    seed: Option<u64>,
    /// The basaltd binary (default: $BASALTD, else next to this program).
    #[arg(long)]
    basaltd: Option<PathBuf>,
    /// Write the history here as JSON lines.
    #[arg(long)]
    history: Option<PathBuf>,
}

fn parse_faults(raw: &str) -> Result<Faults, String> {
    let mut f = Faults {
        kill: false,
        pause: false,
    };
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "kill" => f.kill = true,
            "pause" => f.pause = true,
            "none" => {}
            other => return Err(format!("unknown fault {other:?} (kill, pause, none)")),
        }
    }
    Ok(f)
}

fn print_report(report: &linearizability::Report) {
    for (key, verdict) in &report.keys {
        match verdict {
            Verdict::Linearizable => {}
            Verdict::Violation { explanation } => println!("  VIOLATION {key}: {explanation}"),
            Verdict::Unknown { steps } => println!("  unknown   {key}: search gave up after {steps} steps"),
        }
    }
    println!(
        "  linearizability: {} keys, {} violations, {} unknown",
        report.keys.len(),
        report.violations().len(),
        report.unknown().len()
    );
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check { history, max_steps } => {
            let file = match File::open(&history) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("basalt-sim: {}: {e}", history.display());
                    return ExitCode::from(2);
                }
            };
            let checked = History::from_json_lines(BufReader::new(file)).and_then(|h| {
                linearizability::check(
                    &h,
                    &CheckConfig {
                        max_steps_per_key: max_steps,
                    },
                )
            });
            match checked {
                Ok(report) => {
                    print_report(&report);
                    if report.ok() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("basalt-sim: {}: {e}", history.display());
                    ExitCode::from(2)
                }
            }
        }
        Command::Jepsen(args) => match jepsen_command(args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("basalt-sim: {e}");
                ExitCode::from(2)
            }
        },
    }
}

/// Runs `basalt-sim jepsen`; `Ok(passed)` once the run was judged, `Err` if it could not be.
fn jepsen_command(a: JepsenArgs) -> Result<bool, String> {
    let faults = parse_faults(&a.faults)?;
    let basaltd = match a.basaltd {
        Some(p) => p,
        None => basalt_bench::local_cluster::basaltd_path().map_err(|e| e.to_string())?,
    };
    let seed = a.seed.unwrap_or_else(rand::random);
    let cfg = JepsenConfig {
        basaltd,
        nodes: a.nodes,
        duration: a.duration,
        clients: a.clients,
        keys: a.keys,
        faults,
        fault_interval: a.fault_interval,
        seed,
    };
    println!(
        "basalt-sim jepsen: {} nodes, {} clients, {} keys, {:?}, faults {faults:?} every {:?}, seed {seed}",
        cfg.nodes, cfg.clients, cfg.keys, cfg.duration, cfg.fault_interval
    );
    let runtime = tokio::runtime::Runtime::new().map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let outcome = runtime.block_on(jepsen::run(&cfg)).map_err(|e| e.to_string())?;
    if let Some(path) = &a.history {
        File::create(path)
            .and_then(|f| {
                let mut w = BufWriter::new(f);
                outcome.history.to_json_lines(&mut w)?;
                w.flush()
            })
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    for (t, what) in &outcome.faults {
        println!("  {t:7.2}s  {what}");
    }
    println!(
        "  operations: {} ok, {} failed, {} unknown; history hash {:016x}",
        outcome.ok,
        outcome.failed,
        outcome.unknown,
        outcome.history.hash()
    );
    println!(
        "  longest time without a successful write: {:?}",
        outcome.longest_write_gap
    );
    print_report(&outcome.linearizability);
    for finding in &outcome.durability {
        println!("  LOST {finding}");
    }
    println!("  durability: {} findings", outcome.durability.len());
    for divergence in &outcome.convergence {
        println!("  DIVERGED {divergence}");
    }
    println!(
        "  convergence: {} keys differ between replicas",
        outcome.convergence.len()
    );
    if outcome.passed() {
        println!("PASS");
    } else {
        println!("FAIL (replay with --seed {seed}; faults are timed, so a replay is similar, not identical)");
    }
    Ok(outcome.passed())
}
