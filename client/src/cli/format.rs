//! Turning results into `basaltctl`'s output text.
//!
//! Every function here is pure (data in, `String` out) so that the exact output, which scripts
//! parse, is pinned by unit tests. Invariants: every non-empty output ends with exactly one
//! newline per line; keys and values are printed either as lossy UTF-8 or, with `--hex`, as
//! lowercase hex, the same way everywhere; the JSON form's field names are stable.

use std::fmt::Write as _;

use basalt_proto::v1::{ClusterStatusResponse, Keyspace, Member, PlacementStatusResponse, Role, Shard};
use serde::Serialize;

use crate::client::{KeyspaceDescription, ShardMerge, ShardSplit, Sharding};
use crate::read_mode::{default_mode_name, ServedRead};

/// How keys and values are rendered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteStyle {
    /// Invalid UTF-8 sequences become U+FFFD.
    Utf8Lossy,
    /// Lowercase hex, two digits per byte.
    Hex,
}

impl ByteStyle {
    pub fn from_hex_flag(hex: bool) -> Self {
        if hex {
            ByteStyle::Hex
        } else {
            ByteStyle::Utf8Lossy
        }
    }

    pub fn render(self, bytes: &[u8]) -> String {
        match self {
            ByteStyle::Utf8Lossy => String::from_utf8_lossy(bytes).into_owned(),
            ByteStyle::Hex => bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
                // Writing to a String cannot fail.
                let _ = write!(s, "{b:02x}");
                s
            }),
        }
    }
}

/// `get`'s output: the value and a newline.
pub fn value_line(value: &[u8], style: ByteStyle) -> String {
    format!("{}\n", style.render(value))
}

/// How a read was served, for stderr: `read: mode=stale node=3 applied_index=120 staleness<=850ms`.
pub fn served_line(s: &ServedRead) -> String {
    let staleness = match (s.staleness, s.staleness_unknown) {
        (_, true) => " staleness=unknown".to_string(),
        (Some(d), false) => format!(" staleness<={}ms", d.as_millis()),
        (None, false) => String::new(),
    };
    let mode = match s.mode {
        // The bound asked for is not echoed by the server.
        crate::read_mode::ReadMode::BoundedStaleness(_) => "bounded_staleness".to_string(),
        m => m.to_string(),
    };
    format!(
        "read: mode={mode} node={} applied_index={}{staleness}\n",
        s.node_id, s.applied_index
    )
}

/// `scan`'s output: one `key<TAB>value` line per pair.
pub fn kv_lines<K: AsRef<[u8]>, V: AsRef<[u8]>>(kvs: &[(K, V)], style: ByteStyle) -> String {
    let mut out = String::new();
    for (k, v) in kvs {
        out.push_str(&style.render(k.as_ref()));
        out.push('\t');
        out.push_str(&style.render(v.as_ref()));
        out.push('\n');
    }
    out
}

/// `cas`'s output line when the comparison failed.
pub fn cas_failed_line(current: Option<&[u8]>, style: ByteStyle) -> String {
    match current {
        Some(v) => format!("not swapped: current value is {}\n", style.render(v)),
        None => "not swapped: key is absent\n".to_owned(),
    }
}

/// The lowercase name of a role as carried in `Member::role`; unknown numbers (from a newer
/// server) are shown rather than hidden.
pub fn role_name(role: i32) -> String {
    match Role::try_from(role) {
        Ok(Role::Leader) => "leader".into(),
        Ok(Role::Follower) => "follower".into(),
        Ok(Role::Candidate) => "candidate".into(),
        Ok(Role::Learner) => "learner".into(),
        Ok(Role::Unreachable) => "unreachable".into(),
        Ok(Role::Unspecified) => "unspecified".into(),
        Err(_) => format!("unknown({role})"),
    }
}

#[derive(Serialize)]
struct StatusJson<'a> {
    leader_id: u64,
    members: Vec<MemberJson<'a>>,
    commit_index: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    placement: Option<PlacementJson<'a>>,
}

#[derive(Serialize)]
struct PlacementJson<'a> {
    driver_node: u64,
    nodes: Vec<NodePlacementJson<'a>>,
    steps: Vec<StepJson<'a>>,
}

#[derive(Serialize)]
struct NodePlacementJson<'a> {
    node_id: u64,
    state: &'a str,
    replicas: u32,
    leaders: u32,
}

#[derive(Serialize)]
struct StepJson<'a> {
    kind: &'a str,
    shard_id: u64,
    from_node: u64,
    to_node: u64,
    state: &'a str,
    detail: &'a str,
    started_at_ms: u64,
    finished_at_ms: u64,
}

impl<'a> PlacementJson<'a> {
    fn new(p: &'a PlacementStatusResponse) -> Self {
        Self {
            driver_node: p.driver_node,
            nodes: p
                .nodes
                .iter()
                .map(|n| NodePlacementJson {
                    node_id: n.node_id,
                    state: &n.state,
                    replicas: n.replicas,
                    leaders: n.leaders,
                })
                .collect(),
            steps: p
                .steps
                .iter()
                .map(|s| StepJson {
                    kind: &s.kind,
                    shard_id: s.shard_id,
                    from_node: s.from_node,
                    to_node: s.to_node,
                    state: &s.state,
                    detail: &s.detail,
                    started_at_ms: s.started_at_ms,
                    finished_at_ms: s.finished_at_ms,
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
struct MemberJson<'a> {
    id: u64,
    address: &'a str,
    role: String,
    term: u64,
    applied_index: u64,
    voter: bool,
}

/// `cluster status -o json`: one line of JSON,
/// `{"leader_id":..,"members":[{"id","address","role","term","applied_index","voter"}],"commit_index":..}`.
/// With the placement driver's view (when the meta leader answered) the document also has
/// `"placement":{"driver_node","nodes":[{"node_id","state","replicas","leaders"}],
/// "steps":[{"kind","shard_id","from_node","to_node","state","detail","started_at_ms","finished_at_ms"}]}`.
pub fn cluster_status_with_placement_json(
    status: &ClusterStatusResponse,
    placement: Option<&PlacementStatusResponse>,
) -> String {
    let doc = StatusJson {
        leader_id: status.leader_id,
        members: status
            .members
            .iter()
            .map(|m| MemberJson {
                id: m.id,
                address: &m.address,
                role: role_name(m.role),
                term: m.term,
                applied_index: m.applied_index,
                voter: m.voter,
            })
            .collect(),
        commit_index: status.commit_index,
        placement: placement.map(PlacementJson::new),
    };
    json_line(&doc)
}

/// The placement part of `cluster status -o table`: a table of nodes (STATE, REPLICAS,
/// LEADERS) and one of the driver's steps, running first, then the most recent (at most
/// `max_steps`).
pub fn placement_table(p: &PlacementStatusResponse, max_steps: usize) -> String {
    let nodes: Vec<Vec<String>> = std::iter::once(["NODE", "STATE", "REPLICAS", "LEADERS"].map(String::from).to_vec())
        .chain(p.nodes.iter().map(|n| {
            vec![
                n.node_id.to_string(),
                n.state.clone(),
                n.replicas.to_string(),
                n.leaders.to_string(),
            ]
        }))
        .collect();
    let mut out = format!("placement driver on node {}\n", p.driver_node);
    out.push_str(&render_table(&nodes));
    if p.steps.is_empty() {
        out.push_str("no placement steps yet\n");
        return out;
    }
    let node = |n: u64| if n == 0 { "-".to_owned() } else { n.to_string() };
    let steps: Vec<Vec<String>> = std::iter::once(
        ["STEP", "SHARD", "FROM", "TO", "STATE", "DETAIL"]
            .map(String::from)
            .to_vec(),
    )
    .chain(p.steps.iter().take(max_steps).map(|s| {
        vec![
            s.kind.clone(),
            s.shard_id.to_string(),
            node(s.from_node),
            node(s.to_node),
            s.state.clone(),
            s.detail.clone(),
        ]
    }))
    .collect();
    out.push('\n');
    out.push_str(&render_table(&steps));
    out
}

/// `cluster status -o table`: aligned columns, one member per row, sorted by id.
pub fn cluster_status_table(status: &ClusterStatusResponse) -> String {
    let mut members: Vec<&Member> = status.members.iter().collect();
    members.sort_by_key(|m| m.id);
    let header = ["ID", "ADDRESS", "ROLE", "TERM", "APPLIED", "VOTER"]
        .map(String::from)
        .to_vec();
    let rows: Vec<Vec<String>> = std::iter::once(header)
        .chain(members.iter().map(|m| {
            vec![
                m.id.to_string(),
                m.address.clone(),
                role_name(m.role),
                m.term.to_string(),
                m.applied_index.to_string(),
                m.voter.to_string(),
            ]
        }))
        .collect();
    render_table(&rows)
}

/// Left-aligned columns two spaces apart, each as wide as its widest cell, no trailing blanks.
fn render_table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; columns];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            // Writing to a String cannot fail.
            let _ = write!(line, "{cell:<w$}");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// One line of JSON and a newline.
fn json_line(doc: &impl Serialize) -> String {
    let mut line =
        serde_json::to_string(doc).expect("invariant: structs of integers, strings and bools always serialise");
    line.push('\n');
    line
}

/// The name of a sharding as carried in `Keyspace::sharding`; unknown numbers (from a newer
/// server) are shown rather than hidden.
pub fn sharding_name(sharding: i32) -> String {
    match Sharding::from_wire(sharding) {
        Some(s) => s.as_str().into(),
        None if sharding == 0 => "unspecified".into(),
        None => format!("unknown({sharding})"),
    }
}

/// A shard's bounds as `start..end`, in the server's display form (user keys for range shards,
/// hash values for hash shards); an empty side is unbounded, as in Rust's `a..` and `..b`.
pub fn shard_range(shard: &Shard) -> String {
    format!("{}..{}", shard.start_display, shard.end_display)
}

/// Node ids joined by commas, in the order the server lists them.
fn replica_ids(shard: &Shard) -> String {
    shard
        .replicas
        .iter()
        .map(|r| r.node_id.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Shards in keyspace order, and within a keyspace in key (or hash) order.
fn sorted_shards(shards: &[Shard]) -> Vec<&Shard> {
    let mut sorted: Vec<&Shard> = shards.iter().collect();
    sorted.sort_by(|a, b| {
        (a.keyspace_id, &a.keyspace, &a.start, a.id).cmp(&(b.keyspace_id, &b.keyspace, &b.start, b.id))
    });
    sorted
}

#[derive(Serialize)]
struct KeyspaceJson<'a> {
    name: &'a str,
    id: u32,
    sharding: String,
    replicas: u32,
    initial_shards: u32,
    default_read_mode: String,
}

impl<'a> KeyspaceJson<'a> {
    fn new(ks: &'a Keyspace) -> Self {
        Self {
            name: &ks.name,
            id: ks.id,
            sharding: sharding_name(ks.sharding),
            replicas: ks.replicas,
            initial_shards: ks.initial_shards,
            default_read_mode: default_mode_name(ks.default_read.as_ref()),
        }
    }
}

#[derive(Serialize)]
struct ShardJson<'a> {
    id: u64,
    keyspace: &'a str,
    keyspace_id: u32,
    start: &'a str,
    end: &'a str,
    epoch: u64,
    replicas: Vec<ReplicaJson<'a>>,
    leader_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    moving: Option<MovingJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stats: Option<ShardStatsJson>,
}

#[derive(Serialize)]
struct MovingJson {
    from_node: u64,
    to_node: u64,
}

#[derive(Serialize)]
struct ReplicaJson<'a> {
    node_id: u64,
    address: &'a str,
}

#[derive(Serialize)]
struct ShardStatsJson {
    applied_index: u64,
    approximate_bytes: u64,
    approximate_keys: u64,
}

impl<'a> ShardJson<'a> {
    fn new(shard: &'a Shard, with_stats: bool) -> Self {
        Self {
            id: shard.id,
            keyspace: &shard.keyspace,
            keyspace_id: shard.keyspace_id,
            start: &shard.start_display,
            end: &shard.end_display,
            epoch: shard.epoch,
            replicas: shard
                .replicas
                .iter()
                .map(|r| ReplicaJson {
                    node_id: r.node_id,
                    address: &r.address,
                })
                .collect(),
            leader_id: shard.leader_id,
            moving: (shard.moving_to != 0).then_some(MovingJson {
                from_node: shard.moving_from,
                to_node: shard.moving_to,
            }),
            stats: with_stats.then_some(ShardStatsJson {
                applied_index: shard.applied_index,
                approximate_bytes: shard.approximate_bytes,
                approximate_keys: shard.approximate_keys,
            }),
        }
    }
}

/// `keyspace list -o table`: one keyspace per row, sorted by name.
pub fn keyspaces_table(keyspaces: &[Keyspace]) -> String {
    let mut sorted: Vec<&Keyspace> = keyspaces.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let header = ["NAME", "ID", "SHARDING", "REPLICAS", "INITIAL_SHARDS", "READ_MODE"]
        .map(String::from)
        .to_vec();
    let rows: Vec<Vec<String>> = std::iter::once(header)
        .chain(sorted.iter().map(|ks| {
            vec![
                ks.name.clone(),
                ks.id.to_string(),
                sharding_name(ks.sharding),
                ks.replicas.to_string(),
                ks.initial_shards.to_string(),
                default_mode_name(ks.default_read.as_ref()),
            ]
        }))
        .collect();
    render_table(&rows)
}

/// `keyspace list -o json`: one line,
/// `{"keyspaces":[{"name","id","sharding","replicas","initial_shards","default_read_mode"}]}`,
/// sorted by name.
pub fn keyspaces_json(keyspaces: &[Keyspace]) -> String {
    #[derive(Serialize)]
    struct Doc<'a> {
        keyspaces: Vec<KeyspaceJson<'a>>,
    }
    let mut sorted: Vec<&Keyspace> = keyspaces.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    json_line(&Doc {
        keyspaces: sorted.into_iter().map(KeyspaceJson::new).collect(),
    })
}

/// `shard list -o table`: ID, KEYSPACE, RANGE, EPOCH, REPLICAS (node ids), LEADER (`-` when
/// unknown), and with `--stats` APPLIED, BYTES and KEYS; sorted by keyspace, then range.
pub fn shards_table(shards: &[Shard], with_stats: bool) -> String {
    let mut header = ["ID", "KEYSPACE", "RANGE", "EPOCH", "REPLICAS", "LEADER", "STATE"]
        .map(String::from)
        .to_vec();
    if with_stats {
        header.extend(["APPLIED", "BYTES", "KEYS"].map(String::from));
    }
    let rows: Vec<Vec<String>> = std::iter::once(header)
        .chain(sorted_shards(shards).into_iter().map(|shard| {
            let mut row = vec![
                shard.id.to_string(),
                shard.keyspace.clone(),
                shard_range(shard),
                shard.epoch.to_string(),
                replica_ids(shard),
                match shard.leader_id {
                    0 => "-".to_owned(),
                    id => id.to_string(),
                },
                shard_state(shard),
            ];
            if with_stats {
                row.extend([
                    shard.applied_index.to_string(),
                    shard.approximate_bytes.to_string(),
                    shard.approximate_keys.to_string(),
                ]);
            }
            row
        }))
        .collect();
    render_table(&rows)
}

/// A shard's step in progress: `moving 3->5`, or `-`.
fn shard_state(shard: &Shard) -> String {
    match (shard.moving_from, shard.moving_to) {
        (0, 0) => "-".to_owned(),
        (from, to) => format!("moving {from}->{to}"),
    }
}

/// `shard list -o json`: one line, `{"shards":[{"id","keyspace","keyspace_id","start","end",
/// "epoch","replicas":[{"node_id","address"}],"leader_id"}]}` where `start`/`end` are the display
/// bounds (empty: unbounded); with `--stats` each shard also has
/// `"stats":{"applied_index","approximate_bytes","approximate_keys"}`.
pub fn shards_json(shards: &[Shard], with_stats: bool) -> String {
    #[derive(Serialize)]
    struct Doc<'a> {
        shards: Vec<ShardJson<'a>>,
    }
    json_line(&Doc {
        shards: sorted_shards(shards)
            .into_iter()
            .map(|s| ShardJson::new(s, with_stats))
            .collect(),
    })
}

/// `keyspace describe -o table`: the keyspace as a one-row `keyspace list` table, a blank line,
/// then its shards as in `shard list --stats`.
pub fn keyspace_description_table(desc: &KeyspaceDescription) -> String {
    format!(
        "{}\n{}",
        keyspaces_table(std::slice::from_ref(&desc.keyspace)),
        shards_table(&desc.shards, true)
    )
}

/// `keyspace describe -o json`: one line, `{"keyspace":{..as in keyspace list..},"shards":[..as
/// in shard list --stats..]}`.
pub fn keyspace_description_json(desc: &KeyspaceDescription) -> String {
    #[derive(Serialize)]
    struct Doc<'a> {
        keyspace: KeyspaceJson<'a>,
        shards: Vec<ShardJson<'a>>,
    }
    json_line(&Doc {
        keyspace: KeyspaceJson::new(&desc.keyspace),
        shards: sorted_shards(&desc.shards)
            .into_iter()
            .map(|s| ShardJson::new(s, true))
            .collect(),
    })
}

/// `keyspace create`'s output line.
pub fn keyspace_created_line(ks: &Keyspace) -> String {
    format!(
        "created keyspace {} (id {}, {} sharding, {} shards, {} replicas each)\n",
        ks.name,
        ks.id,
        sharding_name(ks.sharding),
        ks.initial_shards,
        ks.replicas
    )
}

/// `shard split`'s output line.
pub fn shard_split_line(id: u64, split: &ShardSplit) -> String {
    format!(
        "split shard {id} into {} ({}) and {} ({})\n",
        split.left.id,
        shard_range(&split.left),
        split.right.id,
        shard_range(&split.right)
    )
}

/// `shard merge`'s output line.
pub fn shard_merged_line(merge: &ShardMerge) -> String {
    let shard = &merge.shard;
    format!(
        "merged shard {} into {}; {} now covers {} (epoch {})\n",
        merge.absorbed,
        shard.id,
        shard.id,
        shard_range(shard),
        shard.epoch
    )
}

/// `shard merge -o json`: one line, `{"shard":{..as in shard list..},"absorbed":ID}`.
pub fn shard_merged_json(merge: &ShardMerge) -> String {
    #[derive(Serialize)]
    struct Doc<'a> {
        shard: ShardJson<'a>,
        absorbed: u64,
    }
    json_line(&Doc {
        shard: ShardJson::new(&merge.shard, false),
        absorbed: merge.absorbed,
    })
}

/// `shard move`'s output line.
pub fn shard_moved_line(from: u64, to: u64, shard: &Shard) -> String {
    format!(
        "moved shard {} from node {from} to node {to}; replicas {} (epoch {})\n",
        shard.id,
        replica_ids(shard),
        shard.epoch
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read_mode::ReadMode;
    use basalt_proto::v1::Replica;

    fn status() -> ClusterStatusResponse {
        ClusterStatusResponse {
            header: None,
            leader_id: 2,
            commit_index: 41,
            members: vec![
                Member {
                    id: 2,
                    address: "127.0.0.1:7380".into(),
                    role: Role::Leader as i32,
                    term: 3,
                    applied_index: 41,
                    voter: true,
                },
                Member {
                    id: 1,
                    address: "127.0.0.1:7379".into(),
                    role: Role::Follower as i32,
                    term: 3,
                    applied_index: 40,
                    voter: true,
                },
                Member {
                    id: 10,
                    address: "node-ten.example:7379".into(),
                    role: Role::Unreachable as i32,
                    term: 0,
                    applied_index: 0,
                    voter: false,
                },
            ],
        }
    }

    #[test]
    fn table_is_aligned_and_sorted() {
        let expected = "\
ID  ADDRESS                ROLE         TERM  APPLIED  VOTER
1   127.0.0.1:7379         follower     3     40       true
2   127.0.0.1:7380         leader       3     41       true
10  node-ten.example:7379  unreachable  0     0        false
";
        assert_eq!(cluster_status_table(&status()), expected);
    }

    #[test]
    fn table_of_empty_cluster_has_only_the_header() {
        let empty = ClusterStatusResponse::default();
        assert_eq!(
            cluster_status_table(&empty),
            "ID  ADDRESS  ROLE  TERM  APPLIED  VOTER\n"
        );
    }

    #[test]
    fn json_has_the_documented_shape() {
        let line = cluster_status_with_placement_json(&status(), None);
        assert!(line.ends_with('\n') && !line.trim_end().contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).expect("output is JSON");
        assert_eq!(v["leader_id"], 2);
        assert_eq!(v["commit_index"], 41);
        let m = &v["members"][0];
        assert_eq!(m["id"], 2);
        assert_eq!(m["address"], "127.0.0.1:7380");
        assert_eq!(m["role"], "leader");
        assert_eq!(m["term"], 3);
        assert_eq!(m["applied_index"], 41);
        assert_eq!(m["voter"], true);
        assert_eq!(v["members"][2]["role"], "unreachable");
        assert_eq!(v["members"].as_array().map(Vec::len), Some(3));
    }

    fn shard(id: u64, keyspace: &str, ks_id: u32, range: (&str, &str), leader_id: u64) -> Shard {
        Shard {
            id,
            keyspace: keyspace.into(),
            keyspace_id: ks_id,
            start: range.0.as_bytes().to_vec().into(),
            end: range.1.as_bytes().to_vec().into(),
            epoch: id + 1,
            replicas: [1u64, 2, 3]
                .into_iter()
                .map(|n| Replica {
                    node_id: n,
                    address: format!("10.0.0.{n}:7379"),
                })
                .collect(),
            leader_id,
            start_display: range.0.into(),
            end_display: range.1.into(),
            applied_index: 100 + id,
            approximate_bytes: 4096,
            approximate_keys: 12,
            moving_from: 0,
            moving_to: 0,
        }
    }

    fn shards() -> Vec<Shard> {
        vec![
            shard(12, "orders", 2, ("m", ""), 2),
            shard(3, "default", 1, ("", ""), 1),
            shard(7, "orders", 2, ("", "m"), 0),
        ]
    }

    fn keyspace(name: &str, id: u32, sharding: Sharding) -> Keyspace {
        Keyspace {
            name: name.into(),
            id,
            sharding: sharding.to_wire(),
            replicas: 3,
            initial_shards: if sharding == Sharding::Hash { 16 } else { 1 },
            default_read: None,
        }
    }

    #[test]
    fn shard_table_sorts_by_keyspace_then_range() {
        let expected = "\
ID  KEYSPACE  RANGE  EPOCH  REPLICAS  LEADER  STATE
3   default   ..     4      1,2,3     1       -
7   orders    ..m    8      1,2,3     -       -
12  orders    m..    13     1,2,3     2       -
";
        assert_eq!(shards_table(&shards(), false), expected);
        let expected = "\
ID  KEYSPACE  RANGE  EPOCH  REPLICAS  LEADER  STATE  APPLIED  BYTES  KEYS
3   default   ..     4      1,2,3     1       -      103      4096   12
7   orders    ..m    8      1,2,3     -       -      107      4096   12
12  orders    m..    13     1,2,3     2       -      112      4096   12
";
        assert_eq!(shards_table(&shards(), true), expected);
        assert_eq!(
            shards_table(&[], false),
            "ID  KEYSPACE  RANGE  EPOCH  REPLICAS  LEADER  STATE\n"
        );
    }

    #[test]
    fn shard_json_has_the_documented_shape() {
        let line = shards_json(&shards(), false);
        assert!(line.ends_with('\n') && !line.trim_end().contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).expect("output is JSON");
        let ids: Vec<u64> = v["shards"]
            .as_array()
            .expect("an array")
            .iter()
            .map(|s| s["id"].as_u64().expect("an id"))
            .collect();
        assert_eq!(ids, [3, 7, 12]);
        let s = &v["shards"][2];
        assert_eq!(s["keyspace"], "orders");
        assert_eq!(s["keyspace_id"], 2);
        assert_eq!(s["start"], "m");
        assert_eq!(s["end"], "");
        assert_eq!(s["epoch"], 13);
        assert_eq!(s["leader_id"], 2);
        assert_eq!(s["replicas"][1]["node_id"], 2);
        assert_eq!(s["replicas"][1]["address"], "10.0.0.2:7379");
        assert!(s.get("stats").is_none(), "{s}");

        let v: serde_json::Value = serde_json::from_str(&shards_json(&shards(), true)).expect("output is JSON");
        let stats = &v["shards"][0]["stats"];
        assert_eq!(stats["applied_index"], 103);
        assert_eq!(stats["approximate_bytes"], 4096);
        assert_eq!(stats["approximate_keys"], 12);
    }

    #[test]
    fn keyspace_list_formats() {
        let list = [
            keyspace("orders", 2, Sharding::Hash),
            keyspace("default", 1, Sharding::Range),
        ];
        let expected = "\
NAME     ID  SHARDING  REPLICAS  INITIAL_SHARDS  READ_MODE
default  1   range     3         1               linearizable
orders   2   hash      3         16              linearizable
";
        assert_eq!(keyspaces_table(&list), expected);
        let v: serde_json::Value = serde_json::from_str(&keyspaces_json(&list)).expect("output is JSON");
        assert_eq!(v["keyspaces"][0]["name"], "default");
        assert_eq!(v["keyspaces"][1]["name"], "orders");
        assert_eq!(v["keyspaces"][1]["id"], 2);
        assert_eq!(v["keyspaces"][1]["sharding"], "hash");
        assert_eq!(v["keyspaces"][1]["replicas"], 3);
        assert_eq!(v["keyspaces"][1]["initial_shards"], 16);
        assert_eq!(v["keyspaces"][1]["default_read_mode"], "linearizable");
        let mut stale = keyspace("feed", 3, Sharding::Range);
        stale.default_read = ReadMode::BoundedStaleness(std::time::Duration::from_secs(2)).to_pb();
        assert!(keyspaces_table(&[stale]).contains("bounded_staleness:2000ms"));
    }

    #[test]
    fn keyspace_description_formats() {
        let desc = KeyspaceDescription {
            keyspace: keyspace("orders", 2, Sharding::Range),
            shards: shards().into_iter().filter(|s| s.keyspace == "orders").collect(),
        };
        let expected = "\
NAME    ID  SHARDING  REPLICAS  INITIAL_SHARDS  READ_MODE
orders  2   range     3         1               linearizable

ID  KEYSPACE  RANGE  EPOCH  REPLICAS  LEADER  STATE  APPLIED  BYTES  KEYS
7   orders    ..m    8      1,2,3     -       -      107      4096   12
12  orders    m..    13     1,2,3     2       -      112      4096   12
";
        assert_eq!(keyspace_description_table(&desc), expected);
        let v: serde_json::Value = serde_json::from_str(&keyspace_description_json(&desc)).expect("output is JSON");
        assert_eq!(v["keyspace"]["name"], "orders");
        assert_eq!(v["shards"][0]["id"], 7);
        assert_eq!(v["shards"][1]["stats"]["applied_index"], 112);
    }

    #[test]
    fn admin_lines() {
        assert_eq!(
            keyspace_created_line(&keyspace("orders", 2, Sharding::Hash)),
            "created keyspace orders (id 2, hash sharding, 16 shards, 3 replicas each)\n"
        );
        let split = ShardSplit {
            left: shard(7, "orders", 2, ("", "m"), 1),
            right: shard(12, "orders", 2, ("m", ""), 1),
        };
        assert_eq!(shard_split_line(7, &split), "split shard 7 into 7 (..m) and 12 (m..)\n");
        assert_eq!(
            shard_moved_line(4, 3, &shard(7, "orders", 2, ("", "m"), 1)),
            "moved shard 7 from node 4 to node 3; replicas 1,2,3 (epoch 8)\n"
        );
        assert_eq!(sharding_name(0), "unspecified");
        assert_eq!(sharding_name(9), "unknown(9)");
        let merge = ShardMerge {
            shard: shard(7, "orders", 2, ("", "t"), 1),
            absorbed: 12,
        };
        assert_eq!(
            shard_merged_line(&merge),
            "merged shard 12 into 7; 7 now covers ..t (epoch 8)\n"
        );
        let v: serde_json::Value = serde_json::from_str(&shard_merged_json(&merge)).expect("output is JSON");
        assert_eq!(v["absorbed"], 12);
        assert_eq!(v["shard"]["id"], 7);
        assert_eq!(v["shard"]["end"], "t");
        assert_eq!(v["shard"]["epoch"], 8);
        assert!(v["shard"].get("stats").is_none());
    }

    #[test]
    fn roles_have_names() {
        assert_eq!(role_name(Role::Candidate as i32), "candidate");
        assert_eq!(role_name(Role::Learner as i32), "learner");
        assert_eq!(role_name(0), "unspecified");
        assert_eq!(role_name(99), "unknown(99)");
    }

    #[test]
    fn bytes_render_lossy_or_hex() {
        assert_eq!(ByteStyle::Utf8Lossy.render(b"caf\xc3\xa9"), "café");
        assert_eq!(ByteStyle::Utf8Lossy.render(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(ByteStyle::Hex.render(b"\x00\xffA"), "00ff41");
        assert_eq!(ByteStyle::Hex.render(b""), "");
        assert_eq!(ByteStyle::from_hex_flag(true), ByteStyle::Hex);
    }

    #[test]
    fn line_formats() {
        assert_eq!(value_line(b"v", ByteStyle::Utf8Lossy), "v\n");
        assert_eq!(
            kv_lines(&[(&b"a"[..], &b"1"[..]), (&b"b"[..], &b"2"[..])], ByteStyle::Utf8Lossy),
            "a\t1\nb\t2\n"
        );
        assert_eq!(kv_lines(&[(&b"a"[..], &b"1"[..])], ByteStyle::Hex), "61\t31\n");
        assert_eq!(kv_lines::<&[u8], &[u8]>(&[], ByteStyle::Hex), "");
        assert_eq!(
            cas_failed_line(Some(b"x"), ByteStyle::Utf8Lossy),
            "not swapped: current value is x\n"
        );
        assert_eq!(
            cas_failed_line(None, ByteStyle::Utf8Lossy),
            "not swapped: key is absent\n"
        );
    }
}
