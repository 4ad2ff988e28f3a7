//! Removing a replica from a node: everything the engine holds for one group, in one batch.
//!
//! Used when a replica's keyspace is dropped, when its group was merged into a neighbour (then
//! the data stays, owned by the neighbour), and later when a replica moves away. The batch is
//! synced and atomic, so a crash leaves the replica either whole (the node reopens it and the
//! removal is retried) or entirely gone; never a replica with a log but no state machine.

use crate::engine::{Cf, Engine, WriteBatch};
use crate::error::{Result, StorageError};
use crate::keys::{log_range, raft_state_key, replica_key, RaftStateItem, NODE_ITEMS};

/// Deletes group `group`'s log, hard state, applied state, sessions and node record, and the
/// data keys in `data` (`None` keeps the data, for when another local replica now owns it).
pub fn destroy_replica(engine: &dyn Engine, group: u64, data: Option<(Vec<u8>, Vec<u8>)>) -> Result<()> {
    destroy_replica_keeping(engine, group, data.as_slice())
}

/// [`destroy_replica`] deleting the data of every range in `data` (none: keep all of it), for a
/// replica whose range other local replicas partly own now.
pub fn destroy_replica_keeping(engine: &dyn Engine, group: u64, data: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
    let mut batch = WriteBatch::new();
    delete_replica_records(&mut batch, group)?;
    for (start, end) in data {
        batch.delete_range(Cf::Data, start.clone(), end.clone());
    }
    engine.write(batch, true)
}

/// Adds to `batch` the deletion of everything `group` keeps outside the data column family: its
/// log, hard state, applied state, sessions and node record. A merge uses it inside its own apply
/// batch for the group it absorbs.
pub fn delete_replica_records(batch: &mut WriteBatch, group: u64) -> Result<()> {
    if group == NODE_ITEMS {
        return Err(StorageError::InvalidArgument(format!(
            "group {group} is reserved for node-wide records"
        )));
    }
    let (start, end) = log_range(group);
    batch.delete_range(Cf::RaftLog, start, end);
    for item in [RaftStateItem::Vote, RaftStateItem::Committed, RaftStateItem::LastPurged] {
        batch.delete(Cf::RaftState, raft_state_key(group, item));
    }
    batch.delete_range(
        Cf::Meta,
        group.to_be_bytes().to_vec(),
        (group + 1).to_be_bytes().to_vec(),
    );
    batch.delete(Cf::Meta, replica_key(group));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineRead, MemoryEngine};
    use crate::keys::{applied_state_key, data_key, log_key, session_key};
    use crate::record::encode_record;

    #[test]
    fn destroying_a_replica_removes_its_records_and_nothing_else() {
        let engine = MemoryEngine::new();
        let mut b = WriteBatch::new();
        for g in [5u64, 6] {
            b.put(Cf::RaftLog, log_key(g, 1).to_vec(), encode_record(b"l", b"x"));
            b.put(Cf::RaftState, raft_state_key(g, RaftStateItem::Vote), b"v".to_vec());
            b.put(Cf::Meta, applied_state_key(g), b"a".to_vec());
            b.put(Cf::Meta, session_key(g, 9), b"s".to_vec());
            b.put(Cf::Meta, replica_key(g), b"r".to_vec());
        }
        b.put(Cf::Data, data_key(3, &[], b"mine"), b"1".to_vec());
        b.put(Cf::Data, data_key(4, &[], b"theirs"), b"1".to_vec());
        engine.write(b, true).unwrap();

        let (s, e) = crate::keys::keyspace_range(3);
        destroy_replica(&*engine, 5, Some((s, e))).unwrap();

        assert!(engine.get(Cf::RaftLog, &log_key(5, 1)).unwrap().is_none());
        assert!(engine
            .get(Cf::RaftState, &raft_state_key(5, RaftStateItem::Vote))
            .unwrap()
            .is_none());
        assert!(engine.get(Cf::Meta, &applied_state_key(5)).unwrap().is_none());
        assert!(engine.get(Cf::Meta, &session_key(5, 9)).unwrap().is_none());
        assert!(engine.get(Cf::Meta, &replica_key(5)).unwrap().is_none());
        assert!(engine.get(Cf::Data, &data_key(3, &[], b"mine")).unwrap().is_none());
        // The neighbour group and the other keyspace are untouched.
        assert!(engine.get(Cf::RaftLog, &log_key(6, 1)).unwrap().is_some());
        assert!(engine.get(Cf::Meta, &applied_state_key(6)).unwrap().is_some());
        assert!(engine.get(Cf::Meta, &replica_key(6)).unwrap().is_some());
        assert!(engine.get(Cf::Data, &data_key(4, &[], b"theirs")).unwrap().is_some());
        assert!(destroy_replica(&*engine, NODE_ITEMS, None).is_err());
    }
}
