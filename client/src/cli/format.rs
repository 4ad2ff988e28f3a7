//! Turning results into `basaltctl`'s output text.
//!
//! Every function here is pure (data in, `String` out) so that the exact output, which scripts
//! parse, is pinned by unit tests. Invariants: every non-empty output ends with exactly one
//! newline per line; keys and values are printed either as lossy UTF-8 or, with `--hex`, as
//! lowercase hex, the same way everywhere; the JSON form's field names are stable.

use std::fmt::Write as _;

use basalt_proto::v1::{ClusterStatusResponse, Member, Role};
use serde::Serialize;

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
pub fn cluster_status_json(status: &ClusterStatusResponse) -> String {
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
    };
    let mut line =
        serde_json::to_string(&doc).expect("invariant: structs of integers, strings and bools always serialise");
    line.push('\n');
    line
}

/// `cluster status -o table`: aligned columns, one member per row, sorted by id.
pub fn cluster_status_table(status: &ClusterStatusResponse) -> String {
    let mut members: Vec<&Member> = status.members.iter().collect();
    members.sort_by_key(|m| m.id);
    let header = ["ID", "ADDRESS", "ROLE", "TERM", "APPLIED", "VOTER"].map(String::from);
    let rows: Vec<[String; 6]> = std::iter::once(header)
        .chain(members.iter().map(|m| {
            [
                m.id.to_string(),
                m.address.clone(),
                role_name(m.role),
                m.term.to_string(),
                m.applied_index.to_string(),
                m.voter.to_string(),
            ]
        }))
        .collect();
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let line = cluster_status_json(&status());
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
