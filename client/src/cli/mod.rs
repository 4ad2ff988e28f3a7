//! `basaltctl`, the command-line client, built on the library's [`crate::Client`].
//!
//! The binary (`src/bin/basaltctl.rs`) only calls [`main`]. Parsing (`args`, `duration`),
//! execution (`commands`, `scan`), output text (`format`) and exit statuses (`exit`) are separate
//! so each is unit-tested on its own.
//!
//! Invariants: stdout carries only command output (values, pairs, tables), so it can be piped;
//! every failure prints exactly one `error: ...` line on stderr and exits non-zero with the
//! documented status (see `basaltctl --help`); a closed stdout pipe (`basaltctl scan | head`) ends
//! the command quietly instead of panicking. Logging is off unless `RUST_LOG` is set, so it never
//! adds stderr lines a script does not expect.

pub mod args;
pub mod commands;
pub mod duration;
pub mod exit;
pub mod format;
pub mod scan;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::Parser;

use crate::cli::args::Cli;
use crate::cli::exit::{error_line, usage_error_line, CliError, Output, EXIT_USAGE};
use crate::client::Client;
use crate::config::ClientConfig;

/// The client configuration for a command line: `--timeout` bounds the whole command, and one
/// attempt never gets more than the library's default attempt timeout, so a dead node is skipped
/// in time for the others to be tried.
pub fn client_config(cli: &Cli) -> ClientConfig {
    let mut cfg = ClientConfig::new(cli.endpoints.0.iter().cloned());
    cfg.deadline = cli.timeout;
    cfg.attempt_timeout = ClientConfig::DEFAULT_ATTEMPT_TIMEOUT.min(cli.timeout);
    cfg
}

/// Connects and runs the parsed command line.
pub async fn run(cli: &Cli) -> Result<Output, CliError> {
    let client = Client::connect(client_config(cli)).await?;
    commands::execute(&client, cli).await
}

/// The whole of `basaltctl`: parse, run, print, exit.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return parse_failure(&err),
    };
    init_logging();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)
        .and_then(|rt| {
            let result = rt.block_on(run(&cli));
            // In-flight channel tasks have nothing left to do; do not wait for them.
            rt.shutdown_timeout(Duration::ZERO);
            result
        });
    match result {
        Ok(output) => {
            write_quietly(&mut std::io::stdout().lock(), &output.stdout);
            if let Some(note) = &output.note {
                write_quietly(&mut std::io::stderr().lock(), note);
            }
            ExitCode::from(output.code)
        }
        Err(err) => {
            write_quietly(&mut std::io::stderr().lock(), &error_line(&err.to_string()));
            ExitCode::from(err.exit_code())
        }
    }
}

/// `--help` and `--version` print in full and exit 0; real parse errors become one line.
fn parse_failure(err: &clap::Error) -> ExitCode {
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // Printing help can only fail on a closed pipe, where there is no one to tell.
            let _ = err.print();
            ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(EXIT_USAGE))
        }
        _ => {
            write_quietly(&mut std::io::stderr().lock(), &usage_error_line(err));
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// Writes all of `text`, ignoring a closed pipe: the reader has gone away and there is nowhere
/// left to report to.
fn write_quietly(out: &mut impl Write, text: &str) {
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn init_logging() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        // Fails only if a subscriber is already installed, in which case logging is set up.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_bounds_the_call_and_the_attempts() {
        let cli = Cli::try_parse_from(["basaltctl", "--endpoints", "a:1,b:2", "--timeout", "500ms", "get", "k"])
            .expect("valid command line");
        let cfg = client_config(&cli);
        assert_eq!(cfg.endpoints, ["a:1", "b:2"]);
        assert_eq!(cfg.deadline, Duration::from_millis(500));
        assert_eq!(cfg.attempt_timeout, Duration::from_millis(500));

        let cli = Cli::try_parse_from(["basaltctl", "--endpoints", "a:1", "--timeout", "1m", "get", "k"])
            .expect("valid command line");
        let cfg = client_config(&cli);
        assert_eq!(cfg.deadline, Duration::from_secs(60));
        assert_eq!(cfg.attempt_timeout, ClientConfig::DEFAULT_ATTEMPT_TIMEOUT);
    }

    #[test]
    fn quiet_writes_survive_a_closed_pipe() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
        }
        write_quietly(&mut Closed, "value\n");
        let mut buf = Vec::new();
        write_quietly(&mut buf, "value\n");
        assert_eq!(buf, b"value\n");
    }
}
