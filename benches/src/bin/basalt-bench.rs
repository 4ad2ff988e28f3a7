//! `basalt-bench`: closed-loop load generator for Basalt. The logic lives in
//! [`basalt_bench::bench`]; this file only parses arguments, runs it and prints the report.
//!
//! Exit status: 0 when the run measured at least one successful operation, 1 otherwise (an
//! error, or a run in which every operation failed), so scripts can trust a zero.

use std::process::ExitCode;

use basalt_bench::bench::{self, BenchArgs};
use clap::Parser;

fn main() -> ExitCode {
    let args = BenchArgs::parse();
    let json = args.json;
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("basalt-bench: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
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
