//! Running one parsed `basaltctl` command against a cluster.
//!
//! Each command turns its arguments into one library call (or, for `scan`, a sequence of page
//! calls) and its result into an [`Output`]: text for stdout and an exit status. Negative answers
//! that are normal results (a failed comparison, deleting an absent key) are outputs with status
//! 1, not errors; a missing key on `get` is an error line on stderr because `get`'s stdout is
//! reserved for the value itself, so a script can never mistake the message for a value.

use crate::cli::args::{ClusterCommand, Command, LeaderCommand, MemberCommand, OutputFormat};
use crate::cli::exit::{CliError, Output};
use crate::cli::format::{cas_failed_line, cluster_status_json, cluster_status_table, kv_lines, value_line, ByteStyle};
use crate::cli::scan::{self, KeyRange};
use crate::client::{Client, Expect};

/// Runs `command` through `client`.
pub async fn execute(client: &Client, command: &Command, style: ByteStyle) -> Result<Output, CliError> {
    match command {
        Command::Put { key, value } => {
            client.put(key.clone(), value.clone()).await?;
            Ok(Output::ok("OK\n"))
        }
        Command::Get { key } => match client.get(key.clone()).await? {
            Some(value) => Ok(Output::ok(value_line(&value, style))),
            None => Err(CliError::KeyNotFound(key.clone())),
        },
        Command::Del { key } => {
            if client.delete(key.clone()).await? {
                Ok(Output::ok("deleted\n"))
            } else {
                Ok(Output::negative("not found\n"))
            }
        }
        Command::Scan(args) => {
            let kvs = scan::collect(client, KeyRange::from_args(args), args.limit).await?;
            Ok(Output::ok(kv_lines(&kvs, style)))
        }
        Command::Cas(args) => {
            let expected = match &args.expect {
                Some(value) => Expect::Value(value.clone().into()),
                None => Expect::Absent,
            };
            let outcome = client
                .compare_and_swap(args.key.clone(), expected, args.new_value.clone())
                .await?;
            if outcome.succeeded {
                Ok(Output::ok("swapped\n"))
            } else {
                Ok(Output::negative(cas_failed_line(outcome.current.as_deref(), style)))
            }
        }
        Command::Cluster {
            command: ClusterCommand::Status { output },
        } => {
            let status = client.cluster_status().await?;
            Ok(Output::ok(match output {
                OutputFormat::Table => cluster_status_table(&status),
                OutputFormat::Json => cluster_status_json(&status),
            }))
        }
        Command::Member {
            command: MemberCommand::Add { id, addr },
        } => {
            client.add_member(*id, addr).await?;
            Ok(Output::ok(format!("added member {id} at {addr}\n")))
        }
        Command::Member {
            command: MemberCommand::Remove { id },
        } => {
            client.remove_member(*id).await?;
            Ok(Output::ok(format!("removed member {id}\n")))
        }
        Command::Leader {
            command: LeaderCommand::Transfer { id },
        } => {
            client.transfer_leader(*id).await?;
            Ok(Output::ok(format!("leader transfer to {id} accepted\n")))
        }
    }
}
