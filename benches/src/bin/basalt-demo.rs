//! `basalt-demo`: a guided tour of a local 3-node Basalt cluster surviving a leader crash. The
//! logic lives in [`basalt_bench::demo`]; this file only parses arguments and maps the outcome
//! to an exit status (non-zero if any acknowledged write was lost or any step failed).

use std::process::ExitCode;

use basalt_bench::demo::{self, DemoArgs};
use clap::Parser;

fn main() -> ExitCode {
    let args = DemoArgs::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("basalt-demo: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(demo::run(args)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("\nbasalt-demo: {error}");
            ExitCode::FAILURE
        }
    }
}
