//! `basalt-bench`: closed-loop load generator for Basalt, `basalt-bench idle-groups`, the
//! idle-group cost measurement, and `basalt-bench codec`, the replication codec's throughput. The
//! logic lives in [`basalt_bench::bench`], [`basalt_bench::idle`] and [`basalt_bench::codec`];
//! this file only parses arguments, runs one and prints its report.
//!
//! Exit status: 0 when the run measured at least one successful operation, 1 otherwise (an
//! error, or a run in which every operation failed), so scripts can trust a zero.

use std::process::ExitCode;

use basalt_bench::bench::{self, BenchCommand, Cli};
use basalt_bench::{codec, idle};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(BenchCommand::Codec(args)) = &cli.command {
        // No cluster and no async work: runs on this thread (and the codec's own pool).
        return match codec::run(args) {
            Ok(report) => {
                if args.json {
                    println!("{}", report.to_json());
                } else {
                    print!("{}", report.render_text());
                }
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("basalt-bench codec: {error}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("basalt-bench: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(BenchCommand::IdleGroups(args)) = cli.command {
        let json = args.json;
        return match runtime.block_on(idle::run(args)) {
            Ok(report) => {
                if json {
                    println!("{}", report.to_json());
                } else {
                    print!("{}", report.render_text());
                }
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("basalt-bench idle-groups: {error}");
                ExitCode::FAILURE
            }
        };
    }
    let args = cli.load;
    let json = args.json;
    match runtime.block_on(bench::run(args)) {
        Ok(report) => {
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.render_text());
            }
            if report.ops == 0 {
                eprintln!("basalt-bench: no operation succeeded");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("basalt-bench: {error}");
            ExitCode::FAILURE
        }
    }
}
