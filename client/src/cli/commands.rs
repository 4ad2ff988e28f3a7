//! Running one parsed `basaltctl` command against a cluster.
//!
//! Each command turns its arguments into one library call (or, for `scan`, a sequence of page
//! calls) and its result into an [`Output`]: text for stdout and an exit status. Negative answers
//! that are normal results (a failed comparison, deleting an absent key) are outputs with status
//! 1, not errors; a missing key on `get` is an error line on stderr because `get`'s stdout is
//! reserved for the value itself, so a script can never mistake the message for a value.
//!
//! The key-value commands run against `--keyspace` (the `default` keyspace when it is not given);
//! the admin commands name their keyspace or shard themselves, except `shard list`, which lists
//! `--keyspace`'s shards, or every keyspace's when it is not given.

use bytes::Bytes;

use crate::cli::args::{
    Cli, ClusterCommand, Command, KeyspaceCommand, LeaderCommand, MemberCommand, OutputFormat, ShardCommand,
};
use crate::cli::exit::{CliError, Output};
use crate::cli::format::{
    cas_failed_line, cluster_status_table, cluster_status_with_placement_json, keyspace_created_line,
    keyspace_description_json, keyspace_description_table, keyspaces_json, keyspaces_table, kv_lines, placement_table,
    served_line, shard_merged_json, shard_merged_line, shard_moved_line, shard_split_line, shards_json, shards_table,
    value_line, ByteStyle,
};
use crate::cli::scan::{self, KeyRange};
use crate::client::{Client, Expect};
use crate::error::ClientError;

/// Runs the parsed command line `cli` through `client` (whose own keyspace is ignored: the key-value
/// commands use `cli`'s).
pub async fn execute(client: &Client, cli: &Cli) -> Result<Output, CliError> {
    let style = ByteStyle::from_hex_flag(cli.hex);
    let client = &client
        .with_keyspace(cli.keyspace())
        .with_read_mode(cli.read_mode.unwrap_or_default());
    match &cli.command {
        Command::Put { key, value } => {
            client.put(key.clone(), value.clone()).await?;
            Ok(Output::ok("OK\n"))
        }
        Command::Get { key } => {
            let read = client.read(key.clone()).await?;
            let served = cli.read_mode.and(read.served).map(|s| served_line(&s));
            match read.value {
                Some(value) => Ok(Output::ok(value_line(&value, style)).with_note(served)),
                None => Err(CliError::KeyNotFound(key.clone())),
            }
        }
        Command::Del { key } => {
            if client.delete(key.clone()).await? {
                Ok(Output::ok("deleted\n"))
            } else {
                Ok(Output::negative("not found\n"))
            }
        }
        Command::Scan(args) => {
            let scanned = scan::collect(client, KeyRange::from_args(args), args.limit).await?;
            let served = cli.read_mode.and(scanned.served).map(|s| served_line(&s));
            Ok(Output::ok(kv_lines(&scanned.kvs, style)).with_note(served))
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
            // The driver's view needs the meta leader; without one the members still show.
            let placement = client.placement_status().await.ok();
            Ok(Output::ok(match (output, &placement) {
                (OutputFormat::Table, None) => cluster_status_table(&status),
                (OutputFormat::Table, Some(p)) => {
                    format!("{}\n{}", cluster_status_table(&status), placement_table(p, 20))
                }
                (OutputFormat::Json, p) => cluster_status_with_placement_json(&status, p.as_ref()),
            }))
        }
        Command::Member {
            command: MemberCommand::Add { id, addr },
        } => match client.add_member(*id, addr).await {
            Ok(()) => Ok(Output::ok(format!("added member {id} at {addr}\n"))),
            Err(source @ ClientError::DeadlineExceeded { .. }) => Err(CliError::MemberAddUnfinished {
                id: *id,
                addr: addr.clone(),
                source,
            }),
            Err(e) => Err(e.into()),
        },
        Command::Member {
            command: MemberCommand::Remove { id },
        } => {
            client.remove_member(*id).await?;
            Ok(Output::ok(format!("removed member {id}\n")))
        }
        Command::Leader {
            command: LeaderCommand::Transfer { id, shard: None },
        } => {
            client.transfer_leader(*id).await?;
            Ok(Output::ok(format!("leader transfer to {id} accepted\n")))
        }
        Command::Leader {
            command: LeaderCommand::Transfer { id, shard: Some(shard) },
        } => shard_leader_transfer(client, *shard, *id).await,
        Command::Keyspace { command } => keyspace_command(client, command).await,
        Command::Shard { command } => shard_command(client, cli.keyspace.as_deref(), command).await,
    }
}

async fn keyspace_command(client: &Client, command: &KeyspaceCommand) -> Result<Output, CliError> {
    match command {
        KeyspaceCommand::Create {
            name,
            sharding,
            shards,
            replicas,
            default_read_mode,
        } => {
            // 0 on the wire asks for the server's default.
            let created = client
                .create_keyspace_with_read_mode(
                    name,
                    (*sharding).into(),
                    shards.unwrap_or(0),
                    replicas.unwrap_or(0),
                    default_read_mode.unwrap_or_default(),
                )
                .await?;
            Ok(Output::ok(keyspace_created_line(&created)))
        }
        KeyspaceCommand::List { output } => {
            let keyspaces = client.list_keyspaces().await?;
            Ok(Output::ok(match output {
                OutputFormat::Table => keyspaces_table(&keyspaces),
                OutputFormat::Json => keyspaces_json(&keyspaces),
            }))
        }
        KeyspaceCommand::Describe { name, output } => {
            let desc = client.describe_keyspace(name).await?;
            Ok(Output::ok(match output {
                OutputFormat::Table => keyspace_description_table(&desc),
                OutputFormat::Json => keyspace_description_json(&desc),
            }))
        }
        KeyspaceCommand::Drop { name } => {
            client.drop_keyspace(name).await?;
            Ok(Output::ok(format!("dropped keyspace {name}\n")))
        }
    }
}

async fn shard_command(client: &Client, keyspace: Option<&str>, command: &ShardCommand) -> Result<Output, CliError> {
    match command {
        ShardCommand::List { stats, output } => {
            let shards = client.list_shards(keyspace, *stats).await?;
            Ok(Output::ok(match output {
                OutputFormat::Table => shards_table(&shards, *stats),
                OutputFormat::Json => shards_json(&shards, *stats),
            }))
        }
        ShardCommand::Split { id, at } => {
            let at = at.as_deref().map(|at| Bytes::copy_from_slice(at.as_bytes()));
            let split = client.split_shard(*id, at).await?;
            Ok(Output::ok(shard_split_line(*id, &split)))
        }
        ShardCommand::Merge { id, output } => {
            let merge = client.merge_shard(*id).await?;
            Ok(Output::ok(match output {
                OutputFormat::Table => shard_merged_line(&merge),
                OutputFormat::Json => shard_merged_json(&merge),
            }))
        }
        ShardCommand::Move { id, from, to } => {
            let shard = client.move_shard(*id, *from, *to).await?;
            Ok(Output::ok(shard_moved_line(*from, *to, &shard)))
        }
        ShardCommand::LeaderTransfer { id, to } => shard_leader_transfer(client, *id, *to).await,
    }
}

async fn shard_leader_transfer(client: &Client, shard: u64, to: u64) -> Result<Output, CliError> {
    client.transfer_shard_leader(shard, to).await?;
    Ok(Output::ok(format!(
        "leader transfer of shard {shard} to {to} accepted\n"
    )))
}
