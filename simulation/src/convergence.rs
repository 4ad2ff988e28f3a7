//! Replica convergence: once the cluster has healed and replication has caught up, every node
//! must hold the same value for every key.
//!
//! The input is each node's final state, read locally from that node. A node's map lists every
//! key of the shards it replicates, with `None` for a key that is absent there, so a node that
//! lost a key differs from one that holds it. A key missing from a node's map is one whose shard
//! the node does not replicate (with topology changes, shards live on different nodes): only the
//! nodes that list a key are compared on it. Findings are in key order and list the compared
//! nodes' values, because which replicas agree usually tells which one diverged.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A key on which the nodes' final values differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    pub key: String,
    /// Every node's value for the key (`None`: absent).
    pub values: BTreeMap<u64, Option<String>>,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key {:?} differs across nodes:", self.key)?;
        for (node, value) in &self.values {
            match value {
                Some(value) => write!(f, " node {node} = {value:?};")?,
                None => write!(f, " node {node} = absent;")?,
            }
        }
        Ok(())
    }
}

/// Compares the nodes' final states (node id → key → value).
pub fn check(states: &BTreeMap<u64, BTreeMap<String, Option<String>>>) -> Vec<Divergence> {
    let keys: BTreeSet<&String> = states.values().flat_map(BTreeMap::keys).collect();
    keys.into_iter()
        .filter_map(|key| {
            let values: BTreeMap<u64, Option<String>> = states
                .iter()
                .filter_map(|(&node, state)| Some((node, state.get(key)?.clone())))
                .collect();
            let mut distinct = values.values();
            let first = distinct.next()?;
            distinct.any(|v| v != first).then(|| Divergence {
                key: key.clone(),
                values,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(entries: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_owned)))
            .collect()
    }

    #[test]
    fn identical_nodes_converge() {
        let n = node(&[("a", Some("1")), ("b", None)]);
        let states = BTreeMap::from([(1, n.clone()), (2, n.clone()), (3, n)]);
        assert_eq!(check(&states), vec![]);
        // A node that does not list a key does not replicate it, and is not compared on it.
        let states = BTreeMap::from([
            (1, node(&[("a", Some("1")), ("b", Some("2"))])),
            (2, node(&[("a", Some("1"))])),
            (3, node(&[("b", Some("2"))])),
        ]);
        assert_eq!(check(&states), vec![]);
        assert_eq!(check(&BTreeMap::new()), vec![]);
    }

    #[test]
    fn differing_node_is_reported_with_every_value() {
        let states = BTreeMap::from([
            (1, node(&[("a", Some("1")), ("b", Some("x"))])),
            (2, node(&[("a", Some("1")), ("b", Some("x"))])),
            (3, node(&[("a", Some("0")), ("b", None)])),
        ]);
        let found = check(&states);
        let values = |entries: &[(u64, Option<&str>)]| -> BTreeMap<u64, Option<String>> {
            entries.iter().map(|&(n, v)| (n, v.map(str::to_owned))).collect()
        };
        assert_eq!(
            found,
            vec![
                Divergence {
                    key: "a".into(),
                    values: values(&[(1, Some("1")), (2, Some("1")), (3, Some("0"))])
                },
                Divergence {
                    key: "b".into(),
                    values: values(&[(1, Some("x")), (2, Some("x")), (3, None)])
                },
            ]
        );
        assert_eq!(
            found[1].to_string(),
            "key \"b\" differs across nodes: node 1 = \"x\"; node 2 = \"x\"; node 3 = absent;"
        );
    }
}
