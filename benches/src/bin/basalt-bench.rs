//! `basalt-bench`: closed-loop load generator for Basalt, and `basalt-bench idle-groups`, the
//! idle-group cost measurement. The logic lives in [`basalt_bench::bench`] and
//! [`basalt_bench::idle`]; this file only parses arguments, runs one and prints its report.
//!
//! Exit status: 0 when the run measured at least one successful operation, 1 otherwise (an
//! error, or a run in which every operation failed), so scripts can trust a zero.

use std::process::ExitCode;

use basalt_bench::bench::{self, BenchCommand, Cli};
use basalt_bench::idle;
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
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
