//! How `basaltctl` ends: its exit statuses and its error type.
//!
//! Invariants: the exit status tells scripts what happened without parsing text (0 success,
//! 1 a negative answer: comparison failed or key not found, 2 usage error, 3 server or connection
//! error); and an error is reported as exactly one line on stderr, `error: ...`, even when a
//! server message contains line breaks, so `2>err; read -r line <err` always gets the whole story.

use crate::error::ClientError;

/// The command did what was asked.
pub const EXIT_OK: u8 = 0;
/// A negative answer: the comparison of a `cas` failed, or the key of `get`/`del` does not exist.
pub const EXIT_NEGATIVE: u8 = 1;
/// The arguments were wrong (rejected by the parser, or by the server as invalid).
pub const EXIT_USAGE: u8 = 2;
/// The cluster could not be reached or failed the request.
pub const EXIT_FAILURE: u8 = 3;

/// What a successful run prints on stdout, and the status it exits with (`EXIT_OK`, or
/// `EXIT_NEGATIVE` for answers like "not swapped").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    /// Printed on stderr, so that stdout stays the result itself (how a read was served).
    pub note: Option<String>,
    pub code: u8,
}

impl Output {
    pub fn ok(stdout: impl Into<String>) -> Self {
        Self {
            stdout: stdout.into(),
            note: None,
            code: EXIT_OK,
        }
    }

    pub fn negative(stdout: impl Into<String>) -> Self {
        Self {
            stdout: stdout.into(),
            note: None,
            code: EXIT_NEGATIVE,
        }
    }

    pub fn with_note(mut self, note: Option<String>) -> Self {
        self.note = note;
        self
    }
}

/// Why a `basaltctl` command failed.
#[derive(thiserror::Error, Debug)]
pub enum CliError {
    #[error("key not found: {0}")]
    KeyNotFound(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    /// `member add` ran out of time. Its outcome is unknown: the leader records the node as a
    /// learner first and then waits for it to hold the log before making it a voter, so a node
    /// that is not running yet stays a learner. The message says how to finish the job.
    #[error(
        "member add {id} did not finish: {source}; if `basaltctl cluster status` lists node {id}, it \
         was added as a learner and is waiting to catch up: start it (`basaltd --join`) and run \
         `basaltctl member add {id} {addr}` again to make it a voter"
    )]
    MemberAddUnfinished {
        id: u64,
        addr: String,
        #[source]
        source: ClientError,
    },
    /// The server answered something that breaks the protocol's promises.
    #[error("protocol violation by the server: {0}")]
    Protocol(String),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::KeyNotFound(_) => EXIT_NEGATIVE,
            CliError::Client(ClientError::InvalidArgument { .. } | ClientError::Config(_)) => EXIT_USAGE,
            CliError::Client(_)
            | CliError::MemberAddUnfinished { .. }
            | CliError::Protocol(_)
            | CliError::Runtime(_) => EXIT_FAILURE,
        }
    }
}

/// The one stderr line for an error message: `error: ` and the message with line breaks flattened.
pub fn error_line(message: &str) -> String {
    let message = message.strip_prefix("error: ").unwrap_or(message);
    let flat: Vec<&str> = message
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .collect();
    format!("error: {}\n", flat.join(" "))
}

/// The one stderr line for a command-line parse error. clap's own rendering spans several
/// paragraphs (message, tip, usage); the first paragraph is the message (for a missing argument
/// it lists the arguments on the lines below the heading), and `--help` carries the rest.
pub fn usage_error_line(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let message: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .skip_while(|line| line.is_empty())
        .take_while(|line| !line.is_empty())
        .collect();
    let message = if message.is_empty() {
        "invalid arguments".to_owned()
    } else {
        message.join(" ")
    };
    error_line(&format!("{message} (see 'basaltctl --help')"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::args::Cli;
    use clap::Parser;
    use std::time::Duration;

    #[test]
    fn exit_codes_by_error_kind() {
        assert_eq!(CliError::KeyNotFound("k".into()).exit_code(), EXIT_NEGATIVE);
        assert_eq!(
            CliError::Client(ClientError::InvalidArgument {
                field: "key".into(),
                reason: "empty".into()
            })
            .exit_code(),
            EXIT_USAGE
        );
        assert_eq!(
            CliError::Client(ClientError::Config("x".into())).exit_code(),
            EXIT_USAGE
        );
        assert_eq!(
            CliError::Client(ClientError::DeadlineExceeded {
                after: Duration::from_secs(1),
                last_error: "refused".into()
            })
            .exit_code(),
            EXIT_FAILURE
        );
        assert_eq!(CliError::Client(ClientError::SessionExpired).exit_code(), EXIT_FAILURE);
        assert_eq!(CliError::Protocol("x".into()).exit_code(), EXIT_FAILURE);
    }

    #[test]
    fn error_lines_are_single_lines() {
        assert_eq!(
            error_line(&CliError::KeyNotFound("user/1".into()).to_string()),
            "error: key not found: user/1\n"
        );
        assert_eq!(
            error_line("server said:\nsomething\r\n  broke\n"),
            "error: server said: something broke\n"
        );
    }

    #[test]
    fn usage_errors_become_one_line() {
        let err = Cli::try_parse_from(["basaltctl", "frobnicate"]).expect_err("unknown subcommand");
        let line = usage_error_line(&err);
        assert!(line.starts_with("error: "), "{line}");
        assert!(line.contains("frobnicate"), "{line}");
        assert!(!line.starts_with("error: error:"), "{line}");
        assert_eq!(line.matches('\n').count(), 1, "{line:?}");

        let err = Cli::try_parse_from(["basaltctl", "cas", "k", "v"]).expect_err("no comparison");
        let line = usage_error_line(&err);
        assert!(line.contains("not provided: --expect <VALUE>"), "{line}");
        assert!(!line.contains("Usage"), "{line}");
        assert_eq!(line.matches('\n').count(), 1, "{line:?}");
    }
}
