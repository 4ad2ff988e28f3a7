//! The reconciler: on every node, makes the set of local replicas match the catalog.
//!
//! It runs whenever the local meta replica has applied something new (checked every tick), and
//! acts only on this node's own view of the catalog, which may lag but never goes back. Its rules,
//! in the order it applies them:
//!
//! 1. **Destroy** a local replica whose keyspace was dropped, or whose shard the catalog lists
//!    without naming this node (neither among its replicas nor as a move's newcomer). The
//!    catalog's invariant (see [`crate::catalog::ShardDesc::moving`]) makes this safe: the driver
//!    drops a node from a descriptor only after the group has removed it, so the group no longer
//!    counts on this replica. Destroying comes first so that a range being handed back to this
//!    node is free before its new replica opens (local ranges never overlap).
//! 2. **Open a new shard's replica** when a keyspace's bootstrap descriptor names this node: the
//!    replica forms its group with `initialize`, which a group does once.
//! 3. **Open an empty replica** when a move names this node as the newcomer: it joins no group by
//!    itself; the shard's leader adds it as a learner and fills it with a snapshot.
//!
//! Replicas merged away are collected by [`crate::merge::collect_merged_replicas`] (their range now
//! belongs to the left neighbour, so their data stays); a shard being merged is never re-created.
//!
//! Replicas born from a split are not the reconciler's: the split's apply hook opens them on
//! every node that holds the parent, so they never wait for the catalog, and a catalog that does
//! not list them yet does not make them strangers (rule 1 looks only at shards it lists).

use std::collections::BTreeMap;
use std::time::Duration;

use basalt_consensus::{Replication, Role};
use tokio::sync::watch;

use crate::catalog::META_GROUP;
use crate::placement::{Placement, PlacementError};

/// How often the reconciler looks at the catalog.
const TICK: Duration = Duration::from_millis(200);

/// Runs the reconciler (every node), and on the meta leader records the founders' default
/// keyspace, until `shutdown` fires.
pub async fn run(placement: Placement, founders: Vec<u64>, mut shutdown: watch::Receiver<bool>) {
    let mut seen = u64::MAX;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.changed() => return,
        }
        let meta = placement.meta();
        if meta.status().role == Role::Leader && !founders.is_empty() {
            if let Err(e) = placement.ensure_default_keyspace(&founders).await {
                tracing::debug!(error = %e, "recording the default keyspace");
            }
        }
        if meta.status().role == Role::Leader {
            // Merges a previous meta leader left half done are finished or undone here (see
            // `crate::merge`); the merge lock keeps one driver at a time.
            let p = placement.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::merge::resume_merges(&p).await {
                    tracing::debug!(error = %e, "resuming merges");
                }
            });
        }
        let applied = meta.reader().applied_index();
        if applied == seen {
            continue;
        }
        match reconcile(&placement).await {
            Ok(()) => seen = applied,
            Err(e) => tracing::warn!(error = %e, "reconciling replicas with the catalog"),
        }
    }
}

/// One pass of the rules in the module docs.
async fn reconcile(p: &Placement) -> Result<(), PlacementError> {
    let view = p.catalog()?;
    let me = p.node_id();
    for (group, shard) in p.replicas().shards() {
        if group == META_GROUP {
            continue;
        }
        let dropped = view.dropped(shard.keyspace);
        let removed = view.shards.get(&group).is_some_and(|d| !d.names(me));
        if dropped || removed {
            p.replicas().destroy(group).await?;
            tracing::info!(
                group,
                reason = if dropped {
                    "keyspace dropped"
                } else {
                    "moved off this node"
                },
                "destroyed replica"
            );
        }
    }
    crate::merge::collect_merged_replicas(p, &view).await?;
    let addrs = p.addresses();
    for s in view.shards.values() {
        // A shard being merged away is never re-created: its replica here may have been retired
        // by the merge already.
        if p.replicas().get(s.id).is_some() || s.merge.is_some() {
            continue;
        }
        if s.moving.is_some_and(|m| m.to == me) {
            p.replicas().open(s.id, s.shard.clone()).await?;
            tracing::info!(group = s.id, "opened an empty replica to receive a moved shard");
            continue;
        }
        if !s.bootstrap || !s.replicas.contains(&me) {
            continue;
        }
        let members: BTreeMap<u64, String> = s
            .replicas
            .iter()
            .filter_map(|id| addrs.get(id).map(|a| (*id, a.clone())))
            .collect();
        if members.len() != s.replicas.len() {
            continue; // A member's address is not known here yet; the next tick retries.
        }
        let g = p.replicas().open(s.id, s.shard.clone()).await?;
        g.initialize(&members).await?;
        tracing::info!(
            group = s.id,
            keyspace = s.shard.keyspace,
            "created replica of a new shard"
        );
    }
    Ok(())
}
