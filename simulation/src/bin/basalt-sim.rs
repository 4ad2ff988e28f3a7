//! `basalt-sim`: run one simulated seed (`run`), sweep a range of seeds (`sweep`), run the
//! Jepsen-style test against real `basaltd` processes (`jepsen`), or check a recorded history
//! (`check`).
//!
//! Exit status: 0 when every checker passed, 1 when one found a violation, 2 on a usage or
//! set-up error (the run could not be judged).
//!
//! `sweep` runs each seed as a child `basalt-sim run` process: a seed's run must own a fresh
//! process-wide start (tokio numbers its runtimes' seeds from a process-global counter), so a run
//! in a sweep is exactly the run its replay command repeats.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use basalt_client::cli::duration::parse_duration;
use basalt_client::ReadMode;
use basalt_server::PlantedBug;
use basalt_sim::jepsen::{self, JepsenConfig};
use basalt_sim::linearizability::{self, CheckConfig, Verdict};
use basalt_sim::sim::nemesis::Faults;
use basalt_sim::sim::{self, SimConfig};
use basalt_sim::workload::Judgement;
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
    /// Run one seed in the deterministic simulator and check its history.
    Run(RunArgs),
    /// Run a range of seeds (in parallel child processes) and report the failing ones.
    Sweep(SweepArgs),
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

/// The simulated cluster and workload (shared by `run` and `sweep`).
#[derive(clap::Args, Clone)]
struct SimArgs {
    /// Nodes in the cluster (3 to 9).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Concurrent client processes.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Client processes that only read, beside `--clients` (they stay on whichever node serves
    /// them, so they see what a deposed leader answers).
    #[arg(long, default_value_t = 0)]
    readers: usize,
    /// Distinct keys the clients share.
    #[arg(long, default_value_t = 3)]
    keys: usize,
    /// Simulated time the workload runs.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    duration: Duration,
    /// Stop after this many operations (all clients together).
    #[arg(long)]
    ops: Option<u64>,
    /// Fault kinds: all, none, or a list of partition, loss, delay, crash, pause, skew, membership.
    #[arg(long, default_value = "all")]
    faults: Faults,
    /// Plant a bug the checkers must catch: stale-read, ack-before-quorum, stale-lease or
    /// follower-without-read-index.
    #[arg(long)]
    planted_bug: Option<PlantedBug>,
    /// Read modes of the client processes, given to them in turn (comma-separated:
    /// linearizable, lease, follower, bounded:DURATION, stale). Linearizable, lease and follower
    /// reads go to the linearizability checker; bounded and stale reads to the staleness checker.
    #[arg(long, default_value = "linearizable", value_parser = parse_read_modes)]
    read_modes: ReadModes,
}

/// The `--read-modes` list (a newtype, so clap takes it as one value).
#[derive(Clone, Debug)]
struct ReadModes(Vec<ReadMode>);

fn parse_read_modes(s: &str) -> Result<ReadModes, String> {
    let modes = s
        .split(',')
        .map(|m| m.trim().parse::<ReadMode>())
        .collect::<Result<Vec<_>, _>>()?;
    if modes.is_empty() {
        return Err("name at least one read mode".into());
    }
    Ok(ReadModes(modes))
}

impl SimArgs {
    fn config(&self, seed: u64) -> SimConfig {
        let mut c = SimConfig::new(seed);
        c.nodes = self.nodes;
        c.clients = self.clients;
        c.readers = self.readers;
        c.keys = self.keys;
        c.duration = self.duration;
        c.max_ops = self.ops.unwrap_or(u64::MAX);
        c.faults = self.faults;
        c.planted_bug = self.planted_bug;
        c.read_modes = self.read_modes.0.clone();
        c
    }

    /// The same options as command-line arguments, for replay commands and child processes.
    fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            format!("--nodes={}", self.nodes),
            format!("--clients={}", self.clients),
            format!("--readers={}", self.readers),
            format!("--keys={}", self.keys),
            format!("--duration={}ms", self.duration.as_millis()),
            format!("--faults={}", self.faults),
        ];
        if let Some(ops) = self.ops {
            v.push(format!("--ops={ops}"));
        }
        if let Some(bug) = self.planted_bug {
            v.push(format!("--planted-bug={bug}"));
        }
        let modes: Vec<String> = self
            .read_modes
            .0
            .iter()
            .map(|m| match m {
                ReadMode::BoundedStaleness(d) => format!("bounded:{}ms", d.as_millis()),
                m => m.to_string(),
            })
            .collect();
        v.push(format!("--read-modes={}", modes.join(",")));
        v
    }
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long)]
    seed: u64,
    #[command(flatten)]
    sim: SimArgs,
    /// Write the history here as JSON lines.
    #[arg(long)]
    history: Option<PathBuf>,
    /// Print only the result line.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct SweepArgs {
    /// Seeds to run, `A..B` (B excluded).
    #[arg(long, value_parser = parse_seed_range)]
    seeds: std::ops::Range<u64>,
    /// Seeds run at once (default: the number of CPUs).
    #[arg(long)]
    jobs: Option<usize>,
    #[command(flatten)]
    sim: SimArgs,
}

fn parse_seed_range(raw: &str) -> Result<std::ops::Range<u64>, String> {
    let (a, b) = raw
        .split_once("..")
        .ok_or_else(|| format!("expected A..B, got {raw:?}"))?;
    let a: u64 = a.trim().parse().map_err(|e| format!("seed range start {a:?}: {e}"))?;
    let b: u64 = b.trim().parse().map_err(|e| format!("seed range end {b:?}: {e}"))?;
    if a >= b {
        return Err(format!("empty seed range {raw:?}"));
    }
    Ok(a..b)
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
    /// Comma-separated faults: kill, pause, partition (or none). Partitions put each node in a
    /// network namespace of its own, which needs root.
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

fn parse_faults(raw: &str) -> Result<jepsen::Faults, String> {
    let mut f = jepsen::Faults {
        kill: false,
        pause: false,
        partition: false,
    };
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "kill" => f.kill = true,
            "pause" => f.pause = true,
            "partition" => f.partition = true,
            "none" => {}
            other => return Err(format!("unknown fault {other:?} (kill, pause, partition, none)")),
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
    // The nodes' own log lines, for debugging a seed: `RUST_LOG=basalt_server=info basalt-sim run ...`.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
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
        Command::Run(args) => exit(run_command(args)),
        Command::Sweep(args) => exit(sweep_command(args)),
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
    let outcome = jepsen::run(&cfg).map_err(|e| e.to_string())?;
    if let Some(path) = &a.history {
        write_history(path, &outcome.history)?;
    }
    for (t, what) in &outcome.faults {
        println!("  {t:7.2}s  {what}");
    }
    print_judgement(&outcome.judgement, &outcome.history);
    if outcome.passed() {
        println!("PASS");
    } else {
        println!("FAIL (replay with --seed {seed}; faults are timed, so a replay is similar, not identical)");
    }
    Ok(outcome.passed())
}

fn exit(result: Result<bool, String>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("basalt-sim: {e}");
            ExitCode::from(2)
        }
    }
}

fn write_history(path: &std::path::Path, history: &History) -> Result<(), String> {
    File::create(path)
        .and_then(|f| {
            let mut w = BufWriter::new(f);
            history.to_json_lines(&mut w)?;
            w.flush()
        })
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

fn print_judgement(j: &Judgement, history: &History) {
    println!(
        "  operations: {} ok, {} failed, {} unknown; history hash {:016x}",
        j.ok,
        j.failed,
        j.unknown,
        history.hash()
    );
    println!("  longest time without a successful write: {:?}", j.longest_write_gap);
    print_report(&j.linearizability);
    for finding in &j.durability {
        println!("  LOST {finding}");
    }
    println!("  durability: {} findings", j.durability.len());
    for divergence in &j.convergence {
        println!("  DIVERGED {divergence}");
    }
    println!("  convergence: {} keys differ between replicas", j.convergence.len());
    // A stale replica breaks many reads at once: the first few say enough.
    for finding in j.staleness.iter().take(10) {
        println!("  TOO STALE {:?}: {}", finding.read, finding.problem);
    }
    println!(
        "  staleness: {} findings in {} bounded/stale reads",
        j.staleness.len(),
        j.stale_reads
    );
}

/// The one line `run` always prints last, and `sweep` reads back from its children.
fn result_line(seed: u64, outcome: &sim::SimOutcome) -> String {
    let j = &outcome.judgement;
    format!(
        "RESULT seed={seed} {} ops={} violations={} unknown_keys={} lost={} diverged={} too_stale={} panics={} history={:016x} trace={:016x}",
        if outcome.passed() { "PASS" } else { "FAIL" },
        j.ok + j.failed + j.unknown,
        j.linearizability.violations().len(),
        j.linearizability.unknown().len(),
        j.durability.len(),
        j.convergence.len(),
        j.staleness.len(),
        outcome.panics.len(),
        outcome.history.hash(),
        outcome.trace_hash,
    )
}

fn run_command(a: RunArgs) -> Result<bool, String> {
    let cfg = a.sim.config(a.seed);
    let started = std::time::Instant::now();
    let outcome = sim::run(&cfg).map_err(|e| format!("seed {}: {e}", a.seed))?;
    if let Some(path) = &a.history {
        write_history(path, &outcome.history)?;
    }
    if !a.quiet {
        println!(
            "basalt-sim run: seed {}, {} nodes, {} clients, {} readers, {} keys, workload {:?}, faults {}{}",
            a.seed,
            cfg.nodes,
            cfg.clients,
            cfg.readers,
            cfg.keys,
            cfg.duration,
            cfg.faults,
            cfg.planted_bug
                .map(|b| format!(", planted bug {b}"))
                .unwrap_or_default()
        );
        for (t, what) in &outcome.faults {
            println!("  {t:7.2}s  {what}");
        }
        println!(
            "  {} faults injected; simulated {:?} in {:.1?} of real time",
            outcome.faults.iter().filter(|(_, w)| !w.starts_with("healed")).count(),
            outcome.simulated,
            started.elapsed()
        );
        print_judgement(&outcome.judgement, &outcome.history);
        for panic in &outcome.panics {
            println!("  PANIC {panic}");
        }
        println!("  trace hash {:016x}", outcome.trace_hash);
    }
    println!("{}", result_line(a.seed, &outcome));
    Ok(outcome.passed())
}

fn sweep_command(a: SweepArgs) -> Result<bool, String> {
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let jobs = a
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let opts = a.sim.to_args();
    let seeds: Vec<u64> = a.seeds.clone().collect();
    let total = seeds.len();
    println!(
        "basalt-sim sweep: seeds {}..{} ({total}), {jobs} at a time, options {}",
        a.seeds.start,
        a.seeds.end,
        opts.join(" ")
    );
    let started = std::time::Instant::now();
    let queue = std::sync::Mutex::new(seeds.into_iter());
    let failures = std::sync::Mutex::new(Vec::new());
    let done = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(total) {
            scope.spawn(|| loop {
                let Some(seed) = queue.lock().expect("no sweep thread panics holding the queue").next() else {
                    return;
                };
                let out = Command::new(&exe)
                    .arg("run")
                    .arg(format!("--seed={seed}"))
                    .args(&opts)
                    .arg("--quiet")
                    .stdin(Stdio::null())
                    .output();
                let verdict = match out {
                    Ok(o) => {
                        let stdout = String::from_utf8_lossy(&o.stdout);
                        let line = stdout
                            .lines()
                            .rev()
                            .find(|l| l.starts_with("RESULT"))
                            .map(str::to_owned);
                        match (o.status.code(), line) {
                            (Some(0), Some(_)) => None,
                            (_, Some(line)) => Some(line),
                            (code, None) => Some(format!(
                                "seed={seed} ERROR (exit {code:?}): {}",
                                String::from_utf8_lossy(&o.stderr).trim()
                            )),
                        }
                    }
                    Err(e) => Some(format!("seed={seed} ERROR: cannot start: {e}")),
                };
                if let Some(v) = verdict {
                    println!("FAIL {v}\n     replay: basalt-sim run --seed {seed} {}", opts.join(" "));
                    failures
                        .lock()
                        .expect("no sweep thread panics holding the list")
                        .push(seed);
                }
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if n.is_multiple_of(50) {
                    eprintln!("  {n}/{total} seeds done");
                }
            });
        }
    });
    let failed = failures.into_inner().expect("the sweep threads have ended");
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    println!(
        "swept {total} seeds in {:.1?}: {} passed, {} failed; {:.1} seeds/min",
        started.elapsed(),
        total - failed.len(),
        failed.len(),
        total as f64 / minutes.max(1e-9)
    );
    Ok(failed.is_empty())
}
