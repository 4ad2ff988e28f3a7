//! `basaltctl`'s command line, declared with clap's derive API.
//!
//! Invariant: everything that can be checked without a server is checked here, at parse time
//! (endpoint syntax, durations, `--prefix` against START/END, exactly one of `--expect` and
//! `--expect-absent`, a non-empty `--keyspace`, positive shard and replica counts), so that such
//! mistakes exit with the usage status (2) before any connection is attempted and never look like
//! server failures (3).
//!
//! `--keyspace` is global and has no clap default, so that "not given" stays distinguishable:
//! the key-value commands then use the `default` keyspace ([`Cli::keyspace`]) while `shard list`
//! lists every keyspace's shards. (A `shard list --keyspace` of its own would clash with the global
//! option; clap rejects two arguments with one long name.)

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::cli::duration::parse_duration;
use crate::client::{Sharding, DEFAULT_KEYSPACE};
use crate::endpoint::parse_endpoint_list;
use crate::read_mode::ReadMode;

const EXIT_CODES_HELP: &str = "\
Exit status:
  0  success
  1  comparison failed (cas) or key not found (get, del)
  2  usage error (bad arguments, or a request the server rejected as invalid)
  3  server or connection error";

/// basaltctl: command-line client for Basalt clusters.
#[derive(Parser, Debug, Clone, PartialEq)]
#[command(name = "basaltctl", version, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// Comma-separated cluster endpoints (host:port); the leader is found from any of them.
    #[arg(
        long,
        global = true,
        env = "BASALT_ENDPOINTS",
        default_value = "127.0.0.1:7379",
        value_parser = parse_endpoints,
        value_name = "A,B,C"
    )]
    pub endpoints: EndpointList,

    /// Overall time limit for the command, retries included (e.g. 10s, 500ms, 2m).
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Print keys and values as lowercase hex instead of (lossy) UTF-8.
    #[arg(long, global = true)]
    pub hex: bool,

    /// Keyspace for get/put/del/cas/scan [default: default]; for `shard list`, list only its
    /// shards (without it, every keyspace's).
    #[arg(
        short = 'k',
        long,
        global = true,
        env = "BASALT_KEYSPACE",
        value_name = "NAME",
        value_parser = parse_keyspace
    )]
    pub keyspace: Option<String>,

    /// Read mode for get and scan: linearizable, lease, follower, bounded:DURATION (e.g.
    /// bounded:500ms) or stale [default: the keyspace's]. With it, how the read was served
    /// (mode, replica, applied index, staleness bound) is printed on stderr.
    #[arg(long, global = true, env = "BASALT_READ_MODE", value_name = "MODE")]
    pub read_mode: Option<ReadMode>,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The keyspace the key-value commands use.
    pub fn keyspace(&self) -> &str {
        self.keyspace.as_deref().unwrap_or(DEFAULT_KEYSPACE)
    }
}

/// Rejects an empty or blank keyspace name, which on the wire would silently mean `default`.
fn parse_keyspace(raw: &str) -> Result<String, String> {
    if raw.trim().is_empty() {
        return Err("a keyspace name must not be empty".into());
    }
    Ok(raw.to_owned())
}

/// The parsed `--endpoints` list (a newtype so clap treats it as one value, not a repeated flag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointList(pub Vec<String>);

fn parse_endpoints(raw: &str) -> Result<EndpointList, String> {
    parse_endpoint_list(raw).map(EndpointList).map_err(|e| e.to_string())
}

#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum Command {
    /// Write VALUE under KEY (prints "OK").
    Put { key: String, value: String },
    /// Print the value under KEY (exit 1 if the key does not exist).
    Get { key: String },
    /// Delete KEY; prints "deleted", or "not found" and exits 1.
    Del { key: String },
    /// Print `key<TAB>value` lines for keys in [START, END), or under --prefix.
    ///
    /// Keys come in key order, except in a hash-sharded keyspace, where they come in hash order.
    Scan(ScanArgs),
    /// Write NEW_VALUE only if KEY holds --expect's value (or, with --expect-absent, no value).
    ///
    /// Prints "swapped"; otherwise prints "not swapped: current value is X" or "not swapped: key
    /// is absent" and exits 1.
    Cas(CasArgs),
    /// Cluster-wide information.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Membership changes.
    Member {
        #[command(subcommand)]
        command: MemberCommand,
    },
    /// Leadership changes.
    Leader {
        #[command(subcommand)]
        command: LeaderCommand,
    },
    /// Keyspaces: create, list, describe, drop.
    Keyspace {
        #[command(subcommand)]
        command: KeyspaceCommand,
    },
    /// Shards: list, split, move, transfer leadership.
    Shard {
        #[command(subcommand)]
        command: ShardCommand,
    },
}

#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct ScanArgs {
    /// Inclusive first key (default: the first key).
    pub start: Option<String>,
    /// Exclusive end key (default: no end).
    pub end: Option<String>,
    /// Scan exactly the keys starting with this prefix.
    #[arg(long, conflicts_with_all = ["start", "end"])]
    pub prefix: Option<String>,
    /// Print at most N pairs (default: all).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: Option<u32>,
}

#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct CasArgs {
    pub key: String,
    /// The value to write if the comparison holds.
    pub new_value: String,
    /// Swap only if KEY currently holds exactly this value.
    #[arg(long, value_name = "VALUE", required_unless_present = "expect_absent")]
    pub expect: Option<String>,
    /// Swap only if KEY does not exist.
    #[arg(long, conflicts_with = "expect")]
    pub expect_absent: bool,
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum ClusterCommand {
    /// Every member's role, term and applied index.
    Status {
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum MemberCommand {
    /// Add node ID, reachable at ADDR (host:port); it joins as a learner, then votes.
    Add {
        id: u64,
        #[arg(value_name = "ADDR")]
        addr: String,
    },
    /// Remove node ID.
    Remove { id: u64 },
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum LeaderCommand {
    /// Hand leadership to node ID (of the shard given by --shard, else of the cluster).
    Transfer {
        id: u64,
        /// Transfer the leadership of this shard instead of the cluster's.
        #[arg(long, value_name = "SHARD")]
        shard: Option<u64>,
    },
}

/// `--sharding` on the command line.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardingArg {
    /// Shards are key ranges: ordered scans, possible hot spots.
    Range,
    /// Shards are hash ranges: even spread, scans in hash order.
    Hash,
}

impl From<ShardingArg> for Sharding {
    fn from(arg: ShardingArg) -> Self {
        match arg {
            ShardingArg::Range => Sharding::Range,
            ShardingArg::Hash => Sharding::Hash,
        }
    }
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum KeyspaceCommand {
    /// Create keyspace NAME.
    Create {
        #[arg(value_parser = parse_keyspace)]
        name: String,
        /// How keys are divided into shards.
        #[arg(long, value_enum)]
        sharding: ShardingArg,
        /// Shards to start with [default: 1 for range, 16 for hash].
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        shards: Option<u32>,
        /// Replicas per shard [default: 3, or fewer if fewer nodes are live].
        #[arg(long, value_name = "R", value_parser = clap::value_parser!(u32).range(1..))]
        replicas: Option<u32>,
        /// Default read mode of the keyspace's reads (see the global --read-mode for the
        /// syntax) [default: linearizable].
        #[arg(long = "default-read-mode", value_name = "MODE")]
        default_read_mode: Option<ReadMode>,
    },
    /// Every keyspace.
    List {
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Keyspace NAME and its shards.
    Describe {
        name: String,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Drop keyspace NAME and all its data.
    Drop { name: String },
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum ShardCommand {
    /// Shards of --keyspace, or of every keyspace.
    List {
        /// Also ask each shard's leader for its applied index, size and key count (slower).
        #[arg(long)]
        stats: bool,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Split shard ID in two.
    Split {
        id: u64,
        /// Where: a key (range keyspaces) or a decimal hash value (hash keyspaces) [default: the
        /// middle of the shard's data].
        #[arg(long, value_name = "KEY")]
        at: Option<String>,
    },
    /// Merge shard ID with the next shard of its keyspace (a small one: at most 8 MiB); ID keeps
    /// both ranges.
    Merge {
        id: u64,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Move shard ID's replica from node --from to node --to.
    Move {
        id: u64,
        #[arg(long, value_name = "NODE")]
        from: u64,
        #[arg(long, value_name = "NODE")]
        to: u64,
    },
    /// Hand shard ID's leadership to node --to.
    LeaderTransfer {
        id: u64,
        #[arg(long, value_name = "NODE")]
        to: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("basaltctl").chain(args.iter().copied()))
    }

    fn ok(args: &[&str]) -> Cli {
        parse(args).unwrap_or_else(|e| panic!("{args:?} should parse: {e}"))
    }

    fn err_kind(args: &[&str]) -> ErrorKind {
        match parse(args) {
            Ok(cli) => panic!("{args:?} should fail, parsed {cli:?}"),
            Err(e) => e.kind(),
        }
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_defaults() {
        // Only meaningful when the environment does not override the default.
        if std::env::var_os("BASALT_ENDPOINTS").is_some() {
            return;
        }
        if std::env::var_os("BASALT_KEYSPACE").is_some() {
            return;
        }
        let cli = ok(&["get", "k"]);
        assert_eq!(cli.endpoints, EndpointList(vec!["127.0.0.1:7379".into()]));
        assert_eq!(cli.keyspace, None);
        assert_eq!(cli.keyspace(), "default");
        assert_eq!(cli.timeout, Duration::from_secs(10));
        assert!(!cli.hex);
        assert_eq!(cli.command, Command::Get { key: "k".into() });
    }

    #[test]
    fn globals_anywhere() {
        let cli = ok(&["put", "k", "v", "--endpoints", "a:1,b:2", "--timeout", "500ms", "--hex"]);
        assert_eq!(cli.endpoints, EndpointList(vec!["a:1".into(), "b:2".into()]));
        assert_eq!(cli.timeout, Duration::from_millis(500));
        assert!(cli.hex);
        assert_eq!(
            cli.command,
            Command::Put {
                key: "k".into(),
                value: "v".into()
            }
        );
    }

    #[test]
    fn bad_globals_are_usage_errors() {
        assert_eq!(
            err_kind(&["--endpoints", "nope", "get", "k"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(err_kind(&["--timeout", "soon", "get", "k"]), ErrorKind::ValueValidation);
        // No arguments at all shows the help (exit 2); arguments without a command are an error.
        assert_eq!(err_kind(&[]), ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand);
        assert_eq!(err_kind(&["--hex"]), ErrorKind::MissingSubcommand);
    }

    #[test]
    fn scan_forms() {
        let scan = |args: &[&str]| match ok(args).command {
            Command::Scan(s) => s,
            other => panic!("not a scan: {other:?}"),
        };
        assert_eq!(
            scan(&["scan"]),
            ScanArgs {
                start: None,
                end: None,
                prefix: None,
                limit: None
            }
        );
        let s = scan(&["scan", "a", "m", "--limit", "5"]);
        assert_eq!(
            (s.start.as_deref(), s.end.as_deref(), s.limit),
            (Some("a"), Some("m"), Some(5))
        );
        let s = scan(&["scan", "--prefix", "user/"]);
        assert_eq!(s.prefix.as_deref(), Some("user/"));
        assert_eq!(err_kind(&["scan", "a", "--prefix", "p"]), ErrorKind::ArgumentConflict);
        assert_eq!(err_kind(&["scan", "--limit", "0"]), ErrorKind::ValueValidation);
        assert_eq!(err_kind(&["scan", "a", "b", "c"]), ErrorKind::UnknownArgument);
    }

    #[test]
    fn cas_forms() {
        let cas = |args: &[&str]| match ok(args).command {
            Command::Cas(c) => c,
            other => panic!("not a cas: {other:?}"),
        };
        assert_eq!(
            cas(&["cas", "k", "--expect", "old", "new"]),
            CasArgs {
                key: "k".into(),
                new_value: "new".into(),
                expect: Some("old".into()),
                expect_absent: false
            }
        );
        let c = cas(&["cas", "k", "--expect-absent", "new"]);
        assert!(c.expect_absent && c.expect.is_none());
        assert_eq!(err_kind(&["cas", "k", "new"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(
            err_kind(&["cas", "k", "--expect", "a", "--expect-absent", "new"]),
            ErrorKind::ArgumentConflict
        );
    }

    #[test]
    fn admin_forms() {
        assert_eq!(
            ok(&["cluster", "status"]).command,
            Command::Cluster {
                command: ClusterCommand::Status {
                    output: OutputFormat::Table
                }
            }
        );
        assert_eq!(
            ok(&["cluster", "status", "-o", "json"]).command,
            Command::Cluster {
                command: ClusterCommand::Status {
                    output: OutputFormat::Json
                }
            }
        );
        assert_eq!(
            ok(&["member", "add", "4", "10.0.0.4:7379"]).command,
            Command::Member {
                command: MemberCommand::Add {
                    id: 4,
                    addr: "10.0.0.4:7379".into()
                }
            }
        );
        assert_eq!(
            ok(&["member", "remove", "4"]).command,
            Command::Member {
                command: MemberCommand::Remove { id: 4 }
            }
        );
        assert_eq!(
            ok(&["leader", "transfer", "2"]).command,
            Command::Leader {
                command: LeaderCommand::Transfer { id: 2, shard: None }
            }
        );
        assert_eq!(
            ok(&["leader", "transfer", "2", "--shard", "7"]).command,
            Command::Leader {
                command: LeaderCommand::Transfer { id: 2, shard: Some(7) }
            }
        );
        assert_eq!(err_kind(&["member", "remove", "x"]), ErrorKind::ValueValidation);
        assert_eq!(err_kind(&["cluster", "status", "-o", "yaml"]), ErrorKind::InvalidValue);
    }

    #[test]
    fn keyspace_is_global() {
        for args in [
            &["-k", "orders", "get", "k"][..],
            &["get", "k", "--keyspace", "orders"],
            &["scan", "-k", "orders", "--limit", "2"],
        ] {
            let cli = ok(args);
            assert_eq!(cli.keyspace.as_deref(), Some("orders"), "{args:?}");
            assert_eq!(cli.keyspace(), "orders");
        }
        assert_eq!(err_kind(&["-k", "", "get", "k"]), ErrorKind::ValueValidation);
        assert_eq!(err_kind(&["-k", "  ", "get", "k"]), ErrorKind::ValueValidation);
        assert_eq!(err_kind(&["get", "k", "-k"]), ErrorKind::InvalidValue);
    }

    #[test]
    fn keyspace_forms() {
        let ks = |args: &[&str]| match ok(args).command {
            Command::Keyspace { command } => command,
            other => panic!("not a keyspace command: {other:?}"),
        };
        assert_eq!(
            ks(&[
                "keyspace",
                "create",
                "orders",
                "--sharding",
                "hash",
                "--shards",
                "8",
                "--replicas",
                "3"
            ]),
            KeyspaceCommand::Create {
                name: "orders".into(),
                sharding: ShardingArg::Hash,
                shards: Some(8),
                replicas: Some(3),
                default_read_mode: None,
            }
        );
        assert_eq!(
            ks(&["keyspace", "create", "logs", "--sharding", "range"]),
            KeyspaceCommand::Create {
                name: "logs".into(),
                sharding: ShardingArg::Range,
                shards: None,
                replicas: None,
                default_read_mode: None,
            }
        );
        assert_eq!(
            ks(&[
                "keyspace",
                "create",
                "feed",
                "--sharding",
                "range",
                "--default-read-mode",
                "bounded:2s"
            ]),
            KeyspaceCommand::Create {
                name: "feed".into(),
                sharding: ShardingArg::Range,
                shards: None,
                replicas: None,
                default_read_mode: Some(ReadMode::BoundedStaleness(Duration::from_secs(2))),
            }
        );
        assert_eq!(
            ks(&["keyspace", "list", "-o", "json"]),
            KeyspaceCommand::List {
                output: OutputFormat::Json
            }
        );
        assert_eq!(
            ks(&["keyspace", "describe", "orders"]),
            KeyspaceCommand::Describe {
                name: "orders".into(),
                output: OutputFormat::Table
            }
        );
        assert_eq!(
            ks(&["keyspace", "drop", "orders"]),
            KeyspaceCommand::Drop { name: "orders".into() }
        );
        assert_eq!(Sharding::from(ShardingArg::Hash), Sharding::Hash);
        assert_eq!(
            err_kind(&["keyspace", "create", "orders"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            err_kind(&["keyspace", "create", "o", "--sharding", "round-robin"]),
            ErrorKind::InvalidValue
        );
        assert_eq!(
            err_kind(&["keyspace", "create", "o", "--sharding", "hash", "--shards", "0"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            err_kind(&["keyspace", "create", "o", "--sharding", "hash", "--replicas", "0"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            err_kind(&["keyspace", "create", "", "--sharding", "hash"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(err_kind(&["keyspace", "drop"]), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn shard_forms() {
        let shard = |args: &[&str]| {
            let cli = ok(args);
            match cli.command {
                Command::Shard { command } => (cli.keyspace, command),
                other => panic!("not a shard command: {other:?}"),
            }
        };
        if std::env::var_os("BASALT_KEYSPACE").is_none() {
            assert_eq!(
                shard(&["shard", "list"]),
                (
                    None,
                    ShardCommand::List {
                        stats: false,
                        output: OutputFormat::Table
                    }
                )
            );
        }
        assert_eq!(
            shard(&["shard", "list", "--keyspace", "orders", "--stats", "-o", "json"]),
            (
                Some("orders".into()),
                ShardCommand::List {
                    stats: true,
                    output: OutputFormat::Json
                }
            )
        );
        assert_eq!(
            shard(&["shard", "split", "7", "--at", "m"]).1,
            ShardCommand::Split {
                id: 7,
                at: Some("m".into())
            }
        );
        assert_eq!(
            shard(&["shard", "split", "7"]).1,
            ShardCommand::Split { id: 7, at: None }
        );
        assert_eq!(
            shard(&["shard", "merge", "7"]).1,
            ShardCommand::Merge {
                id: 7,
                output: OutputFormat::Table
            }
        );
        assert_eq!(
            shard(&["shard", "merge", "7", "-o", "json"]).1,
            ShardCommand::Merge {
                id: 7,
                output: OutputFormat::Json
            }
        );
        assert_eq!(err_kind(&["shard", "merge"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(
            shard(&["shard", "move", "7", "--from", "1", "--to", "4"]).1,
            ShardCommand::Move { id: 7, from: 1, to: 4 }
        );
        assert_eq!(
            shard(&["shard", "leader-transfer", "7", "--to", "2"]).1,
            ShardCommand::LeaderTransfer { id: 7, to: 2 }
        );
        assert_eq!(
            err_kind(&["shard", "move", "7", "--from", "1"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            err_kind(&["shard", "leader-transfer", "7"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(err_kind(&["shard", "split", "seven"]), ErrorKind::ValueValidation);
        assert_eq!(err_kind(&["shard", "list", "-o", "yaml"]), ErrorKind::InvalidValue);
    }

    #[test]
    fn help_documents_exit_codes() {
        let help = Cli::command().render_help().to_string();
        assert!(help.contains("Exit status:"), "{help}");
        assert!(help.contains("3  server or connection error"), "{help}");
    }
}
