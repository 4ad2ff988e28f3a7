//! Merging a shard into its left neighbour, as the state machines see it.
//!
//! A merge moves the right shard R's range, data and client sessions into its left neighbour L
//! through L's own log, so L's replicas need not hold R's replicas on the same nodes:
//!
//! 1. R applies [`Command::Freeze`]: from that entry on it refuses every write with `WrongShard`
//!    (reads still work) and its epoch rises, so its data and sessions are final.
//! 2. The data and sessions of the frozen R are read from any replica that has applied the
//!    freeze ([`KvStateMachine::export_for_merge`]); `(frozen, epoch)` names exactly one state,
//!    because R changes nothing more until it is unfrozen, which raises the epoch again.
//! 3. L applies [`Command::Merge`] carrying them ([`KvStateMachine::apply_merge`]): in one batch
//!    its range grows over R's, its epoch passes both, R's data and sessions become L's, and if
//!    this node holds R's replica, R's Raft state and node record go (its data stays: it is L's).
//! 4. An abandoned merge is undone with [`Command::Unfreeze`] on R, but only once the merge can
//!    no longer apply (the server's driver decides that; see `basalt_server::merge`).
//!
//! Invariants and why:
//!
//! * **Every step is checked at apply time against the replicated state**, never against what
//!   the proposer believed: a freeze names R's epoch, a merge L's epoch and the frozen R it
//!   absorbs, and a step whose expectation no longer holds is refused (`MergeRefused`), changing
//!   nothing. A merge applied once moves L's epoch, so the same merge proposed again is refused.
//! * **Data is carried, then verified**: every key of the merge must be a well-formed data key
//!   inside R's range; R's range in L's engine is cleared first, so whatever a local replica of
//!   R (possibly behind) left there cannot survive next to the carried copy.
//! * **Sessions are merged so no retried write applies twice** (see
//!   [`crate::session::ClientSession::absorb`]): a write R applied and cached is answered from
//!   the cache when the client retries it at L.
//! * **Bounded**: merges are for small shards. The exported state may not exceed
//!   [`MAX_MERGE_BYTES`], far below the 64 MiB limit of a peer message that carries the entry.

use serde::{Deserialize, Serialize};

use crate::engine::{Cf, EngineRead, WriteBatch};
use crate::error::{Result, StorageError};
use crate::keys::{self, decode_session_key, session_range};
use crate::record::{decode_record, encode_record};
use crate::replica::delete_replica_records;
use crate::session::ClientSession;
use crate::shard::ShardState;
use crate::state_machine::{
    put_applied, AppliedState, ApplyEntry, Command, KvStateMachine, WriteRequest, WriteResponse,
};

/// The most a merged-away shard may hold (data keys and values plus encoded sessions).
pub const MAX_MERGE_BYTES: u64 = 8 << 20;

/// One data pair of a merge: the stored (encoded) key and the plain value.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MergePair {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// Everything a frozen shard hands to the neighbour that absorbs it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MergeSource {
    /// The frozen shard, as its replicas applied it.
    pub shard: ShardState,
    /// Its data, in key order.
    pub kvs: Vec<MergePair>,
    /// Its client sessions, by client id.
    pub sessions: Vec<ClientSession>,
}

/// What [`KvStateMachine::export_for_merge`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MergeExport {
    Ready(MergeSource),
    /// This replica has not applied a freeze (it may be behind, or the shard is not frozen).
    NotFrozen {
        shard: ShardState,
    },
    /// The shard holds more than the limit; nothing was returned.
    TooLarge {
        limit: u64,
    },
}

/// Applies a [`Command::Freeze`] or [`Command::Unfreeze`] to `shard` (the batch's view of it)
/// and answers it. Any other command is a caller bug, answered as refused.
pub(crate) fn apply_freeze(shard: &mut ShardState, command: &Command) -> WriteResponse {
    let refused = |shard: &ShardState, reason: String| WriteResponse::MergeRefused {
        shard: shard.clone(),
        reason,
    };
    match command {
        Command::Freeze { expected_epoch } => {
            if shard.frozen && shard.epoch == expected_epoch.saturating_add(1) {
                WriteResponse::Frozen { shard: shard.clone() }
            } else if shard.frozen {
                refused(
                    shard,
                    format!(
                        "the shard is frozen at epoch {}, not at {} as this freeze would make it",
                        shard.epoch,
                        expected_epoch.saturating_add(1)
                    ),
                )
            } else if shard.epoch != *expected_epoch {
                refused(
                    shard,
                    format!("shard epoch is {}, the freeze expected {expected_epoch}", shard.epoch),
                )
            } else {
                shard.frozen = true;
                shard.epoch += 1;
                WriteResponse::Frozen { shard: shard.clone() }
            }
        }
        Command::Unfreeze { frozen_epoch } => {
            if !shard.frozen && shard.epoch == frozen_epoch.saturating_add(1) {
                WriteResponse::Unfrozen { shard: shard.clone() }
            } else if !shard.frozen || shard.epoch != *frozen_epoch {
                refused(
                    shard,
                    format!(
                        "the shard is {} at epoch {}, the unfreeze expected it frozen at {frozen_epoch}",
                        if shard.frozen { "frozen" } else { "not frozen" },
                        shard.epoch
                    ),
                )
            } else {
                shard.frozen = false;
                shard.epoch += 1;
                WriteResponse::Unfrozen { shard: shard.clone() }
            }
        }
        other => refused(shard, format!("{other:?} is not a freeze or unfreeze")),
    }
}

impl MergeSource {
    /// The size the merge limit counts: data keys and values, and encoded sessions.
    pub fn bytes(&self) -> Result<u64> {
        let mut total: u64 = self.kvs.iter().map(|p| (p.key.len() + p.value.len()) as u64).sum();
        for s in &self.sessions {
            total += s.encode()?.len() as u64;
        }
        Ok(total)
    }
}

impl KvStateMachine {
    /// The data and sessions of this frozen shard, read from one consistent engine view (its
    /// applied state included, which is what decides whether the shard is frozen), or why not.
    /// Stops reading as soon as more than `limit` bytes were found.
    pub fn export_for_merge(&self, limit: u64) -> Result<MergeExport> {
        let group = self.group;
        let mut out = None;
        self.engine.with_snapshot(&mut |view| {
            out = Some(export_view(view, group, limit)?);
            Ok(())
        })?;
        Ok(out.expect("with_snapshot runs the closure exactly once when it returns Ok"))
    }

    /// The shard this group would serve after applying `request`, a [`Command::Merge`], or
    /// `None` if it would be refused (or is no merge). Lets the caller prepare the node (stop
    /// the local replica of the absorbed group) only for a merge that will apply.
    pub fn check_merge(&self, request: &WriteRequest) -> Option<ShardState> {
        let Command::Merge {
            right_group,
            expected_left_epoch,
            source,
        } = &request.command
        else {
            return None;
        };
        match self.merge_refusal(*right_group, *expected_left_epoch, source) {
            Some(_) => None,
            None => Some(merged_shard(&self.shard, &source.shard)),
        }
    }

    fn merge_refusal(&self, right_group: u64, expected_left_epoch: u64, source: &MergeSource) -> Option<String> {
        let (left, right) = (&self.shard, &source.shard);
        if left.frozen {
            return Some("this shard is frozen for a merge of its own".into());
        }
        if expected_left_epoch != left.epoch {
            return Some(format!(
                "shard epoch is {}, the merge expected {expected_left_epoch}",
                left.epoch
            ));
        }
        if right_group == self.group {
            return Some("a shard cannot absorb itself".into());
        }
        if !right.frozen {
            return Some("the right shard is not frozen".into());
        }
        if right.keyspace != left.keyspace || right.hashed != left.hashed {
            return Some("the right shard belongs to another keyspace".into());
        }
        if let Err(e) = right.validate() {
            return Some(format!("the right shard is invalid: {e}"));
        }
        if left.end != right.start {
            return Some("the shards are not adjacent (this shard does not end where the right one starts)".into());
        }
        let prefix = right.prefix_len();
        for pair in &source.kvs {
            if !right.contains(&pair.key) || keys::decode_data_key(right.keyspace, prefix, &pair.key).is_err() {
                return Some(format!(
                    "key {:?} is not a data key of the right shard's range",
                    pair.key
                ));
            }
        }
        None
    }

    /// Applies a [`Command::Merge`] at `index`, alone, as one engine write (not synced, like
    /// every apply: the log is the durable copy). Either the whole merge is applied or, when
    /// refused, nothing but the applied index moves:
    /// - this shard's range grows to the right shard's end; its epoch becomes one more than the
    ///   larger of the two epochs, so a routing view of either side is recognised as stale;
    /// - the right shard's range is cleared and the carried pairs written;
    /// - the carried sessions are merged into this group's (see [`ClientSession::absorb`]);
    /// - the right group's Raft log, hard state, applied state, sessions and node record on this
    ///   node are deleted, if it has any (not its data: that is this group's now). The node must
    ///   have stopped that replica before (see the consensus layer's claim hook).
    pub fn apply_merge(&mut self, index: u64, request: &WriteRequest, applied_meta: Vec<u8>) -> Result<WriteResponse> {
        self.check_live()?;
        self.check_indexes(&[ApplyEntry { index, request: None }], index)?;
        let Command::Merge {
            right_group,
            expected_left_epoch,
            source,
        } = &request.command
        else {
            return Err(StorageError::InvalidArgument(format!(
                "group {}: apply_merge given a non-merge entry {index}",
                self.group
            )));
        };
        let mut batch = WriteBatch::new();
        let mut changes = None;
        let (response, shard) = match self.merge_refusal(*right_group, *expected_left_epoch, source) {
            Some(reason) => (
                WriteResponse::MergeRefused {
                    shard: self.shard.clone(),
                    reason,
                },
                self.shard.clone(),
            ),
            None => {
                let right = &source.shard;
                let merged = merged_shard(&self.shard, right);
                batch.delete_range(Cf::Data, right.start.clone(), right.end.clone());
                for pair in &source.kvs {
                    batch.put(Cf::Data, pair.key.clone(), encode_record(&pair.key, &pair.value));
                }
                let mut txn = self.sessions.begin();
                for session in &source.sessions {
                    txn.absorb(session.clone(), index);
                }
                changes = Some(txn.finish(self.group, &mut batch)?);
                delete_replica_records(&mut batch, *right_group)?;
                (WriteResponse::Merged { shard: merged.clone() }, merged)
            }
        };
        let applied = AppliedState {
            index,
            meta: applied_meta,
            shard,
        };
        put_applied(&mut batch, self.group, &applied)?;
        self.engine.write(batch, false)?;
        if let Some(changes) = changes {
            self.sessions.commit(changes);
        }
        self.shard = applied.shard.clone();
        self.applied = Some(applied);
        Ok(response)
    }
}

/// The shard `left` becomes by absorbing `right`.
fn merged_shard(left: &ShardState, right: &ShardState) -> ShardState {
    ShardState {
        end: right.end.clone(),
        epoch: left.epoch.max(right.epoch) + 1,
        frozen: false,
        ..left.clone()
    }
}

fn export_view(view: &dyn EngineRead, group: u64, limit: u64) -> Result<MergeExport> {
    let Some(applied) = AppliedState::load(view, group)? else {
        return Err(StorageError::InvalidArgument(format!(
            "group {group} has applied nothing; there is nothing to export"
        )));
    };
    let shard = applied.shard;
    if !shard.frozen {
        return Ok(MergeExport::NotFrozen { shard });
    }
    let mut total = 0u64;
    let mut kvs = Vec::new();
    for item in view.scan(Cf::Data, &shard.start, Some(&shard.end))? {
        let (key, stored) = item?;
        let value = decode_record(Cf::Data, &key, &stored)?.to_vec();
        total += (key.len() + value.len()) as u64;
        if total > limit {
            return Ok(MergeExport::TooLarge { limit });
        }
        kvs.push(MergePair { key, value });
    }
    let mut sessions = Vec::new();
    let (start, end) = session_range(group);
    for item in view.scan(Cf::Meta, &start, Some(&end))? {
        let (key, stored) = item?;
        let client_id = decode_session_key(group, &key)?;
        let payload = decode_record(Cf::Meta, &key, &stored)?;
        total += payload.len() as u64;
        if total > limit {
            return Ok(MergeExport::TooLarge { limit });
        }
        sessions.push(ClientSession::decode(client_id, payload)?);
    }
    Ok(MergeExport::Ready(MergeSource { shard, kvs, sessions }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::engine::MemoryEngine;
    use crate::keys::{applied_state_key, replica_key, DEFAULT_KEYSPACE};
    use crate::session::Session;
    use crate::snapshot::build_snapshot;

    const LEFT: u64 = 3;
    const RIGHT: u64 = 4;

    fn session(client_id: u64, sequence: u64, acked_through: u64) -> Option<Session> {
        Some(Session {
            client_id,
            sequence,
            acked_through,
        })
    }

    fn put(session: Option<Session>, k: &str, v: &str) -> WriteRequest {
        WriteRequest {
            session,
            command: Command::Put {
                key: k.into(),
                value: v.into(),
            },
        }
    }

    fn cas(session: Option<Session>, k: &str, expected: Option<&str>, new: &str) -> WriteRequest {
        WriteRequest {
            session,
            command: Command::CompareAndSwap {
                key: k.into(),
                expected: expected.map(Into::into),
                new_value: new.into(),
            },
        }
    }

    fn cmd(command: Command) -> WriteRequest {
        WriteRequest { session: None, command }
    }

    fn next_index(sm: &KvStateMachine) -> u64 {
        sm.applied_meta().map_or(1, |_| sm.applied_index() + 1)
    }

    /// Applies each request as its own entry of one batch.
    fn apply(sm: &mut KvStateMachine, requests: &[WriteRequest]) -> Vec<WriteResponse> {
        let first = next_index(sm);
        let entries: Vec<ApplyEntry<'_>> = requests
            .iter()
            .enumerate()
            .map(|(i, r)| ApplyEntry {
                index: first + i as u64,
                request: Some(r),
            })
            .collect();
        let last = first + requests.len() as u64 - 1;
        sm.apply(&entries, last, vec![]).unwrap()
    }

    fn merge_into(left: &mut KvStateMachine, request: &WriteRequest) -> WriteResponse {
        let index = next_index(left);
        left.apply_merge(index, request, vec![]).unwrap()
    }

    /// A keyspace split at user key "m" into LEFT and RIGHT, both at epoch 2, as a split leaves
    /// them (RIGHT with a copy of LEFT's sessions and a replica record).
    fn split_pair(engine: &Arc<MemoryEngine>) -> (KvStateMachine, KvStateMachine) {
        let whole = ShardState::whole_keyspace(DEFAULT_KEYSPACE, false);
        let mut left = KvStateMachine::open(engine.clone(), LEFT, whole.clone()).unwrap();
        apply(&mut left, &[put(session(9, 1, 0), "a", "before split")]);
        let at = whole.data_key(b"m");
        let split = cmd(Command::Split {
            at,
            new_group: RIGHT,
            expected_epoch: 1,
        });
        let index = next_index(&left);
        let WriteResponse::Split { right, .. } = left.apply_split(index, &split, vec![], vec![]).unwrap() else {
            panic!("split refused");
        };
        let right = KvStateMachine::open(engine.clone(), RIGHT, right).unwrap();
        (left, right)
    }

    fn export(sm: &KvStateMachine) -> MergeSource {
        match sm.export_for_merge(MAX_MERGE_BYTES).unwrap() {
            MergeExport::Ready(source) => source,
            other => panic!("export: {other:?}"),
        }
    }

    fn merge_cmd(source: MergeSource, expected_left_epoch: u64) -> WriteRequest {
        cmd(Command::Merge {
            right_group: RIGHT,
            expected_left_epoch,
            source,
        })
    }

    #[test]
    fn a_frozen_shard_refuses_writes_keeps_serving_reads_and_freezing_again_changes_nothing() {
        let engine = MemoryEngine::new();
        let (_, mut right) = split_pair(&engine);
        // A write before the freeze in the same batch applies; the ones after it are refused,
        // and the refused write's session does not remember it (it may apply elsewhere).
        let responses = apply(
            &mut right,
            &[
                put(None, "p", "1"),
                cmd(Command::Freeze { expected_epoch: 2 }),
                put(session(5, 1, 0), "q", "1"),
                cas(None, "p", Some("1"), "2"),
            ],
        );
        let WriteResponse::Frozen { shard } = &responses[1] else {
            panic!("{responses:?}");
        };
        assert!(shard.frozen && shard.epoch == 3);
        assert!(matches!(&responses[2], WriteResponse::WrongShard { shard } if shard.frozen));
        assert!(matches!(&responses[3], WriteResponse::WrongShard { .. }));
        assert_eq!(right.get(b"p").unwrap(), Some(b"1".to_vec()), "reads still work");
        assert_eq!(right.get(b"q").unwrap(), None);
        assert_eq!(right.session_count(), 1, "only the session copied by the split");
        assert!(right.shard().frozen && right.shard().epoch == 3);

        // A retried freeze answers the same and changes nothing; a stale or newer one is refused.
        let again = apply(&mut right, &[cmd(Command::Freeze { expected_epoch: 2 })]);
        assert_eq!(again, vec![WriteResponse::Frozen { shard: shard.clone() }]);
        assert!(matches!(
            apply(&mut right, &[cmd(Command::Freeze { expected_epoch: 3 })])[0],
            WriteResponse::MergeRefused { .. }
        ));
        assert_eq!(right.shard(), shard);
        // A frozen shard does not split.
        let split = cmd(Command::Split {
            at: shard.data_key(b"t"),
            new_group: 9,
            expected_epoch: 3,
        });
        let index = next_index(&right);
        assert!(matches!(
            right.apply_split(index, &split, vec![], vec![]).unwrap(),
            WriteResponse::SplitRefused { .. }
        ));
        // The frozen state survives a restart (it is in the applied state).
        let reopened = KvStateMachine::open(
            engine.clone(),
            RIGHT,
            ShardState::whole_keyspace(DEFAULT_KEYSPACE, false),
        )
        .unwrap();
        assert_eq!(reopened.shard(), shard);
    }

    #[test]
    fn a_freeze_at_a_stale_epoch_is_refused() {
        let engine = MemoryEngine::new();
        let (_, mut right) = split_pair(&engine);
        let r = apply(&mut right, &[cmd(Command::Freeze { expected_epoch: 1 })]);
        assert!(matches!(&r[0], WriteResponse::MergeRefused { shard, .. } if !shard.frozen && shard.epoch == 2));
        assert_eq!(apply(&mut right, &[put(None, "x", "1")]), vec![WriteResponse::Put]);
    }

    #[test]
    fn unfreezing_accepts_writes_again_at_a_new_epoch_and_is_idempotent() {
        let engine = MemoryEngine::new();
        let (_, mut right) = split_pair(&engine);
        apply(&mut right, &[cmd(Command::Freeze { expected_epoch: 2 })]);
        let r = apply(
            &mut right,
            &[
                cmd(Command::Unfreeze { frozen_epoch: 3 }),
                put(None, "x", "1"),
                cmd(Command::Unfreeze { frozen_epoch: 3 }),
                cmd(Command::Unfreeze { frozen_epoch: 7 }),
            ],
        );
        let WriteResponse::Unfrozen { shard } = &r[0] else {
            panic!("{r:?}");
        };
        assert!(!shard.frozen && shard.epoch == 4);
        assert_eq!(r[1], WriteResponse::Put);
        assert_eq!(r[2], r[0], "a retried unfreeze answers the same");
        assert!(matches!(&r[3], WriteResponse::MergeRefused { .. }));
        assert_eq!(right.get(b"x").unwrap(), Some(b"1".to_vec()));
        // Data exported by the abandoned freeze can no longer be merged: it is not frozen now.
        assert!(matches!(
            right.export_for_merge(MAX_MERGE_BYTES).unwrap(),
            MergeExport::NotFrozen { .. }
        ));
    }

    #[test]
    fn a_merge_extends_the_range_raises_the_epoch_and_carries_data_and_sessions() {
        let engine = MemoryEngine::new();
        let (mut left, mut right) = split_pair(&engine);
        apply(&mut left, &[put(session(1, 1, 0), "b", "left"), put(None, "c", "left")]);
        apply(&mut left, &[cmd(Command::Freeze { expected_epoch: 2 })]);
        apply(&mut left, &[cmd(Command::Unfreeze { frozen_epoch: 3 })]); // left is at epoch 4
                                                                         // Client 7 has a write applied by the right shard whose answer it never saw (seq 2) and
                                                                         // one it saw (seq 1); client 1 wrote on both sides.
        apply(
            &mut right,
            &[
                put(session(7, 1, 0), "n", "right"),
                cas(session(7, 2, 1), "o", None, "first"),
                put(session(1, 2, 0), "p", "right"),
                put(None, "zz", "right"),
            ],
        );
        apply(&mut right, &[cmd(Command::Freeze { expected_epoch: 2 })]);
        let source = export(&right);
        assert_eq!(source.kvs.len(), 4);
        assert!(source.bytes().unwrap() > 0);

        let left_before = left.shard().clone();
        let right_shard = right.shard().clone();
        let response = merge_into(&mut left, &merge_cmd(source, 4));
        let WriteResponse::Merged { shard } = &response else {
            panic!("{response:?}");
        };
        assert_eq!(
            (shard.start.clone(), shard.end.clone()),
            (left_before.start, right_shard.end.clone())
        );
        assert_eq!(shard.epoch, 5, "one past the larger epoch (left 4, right 3)");
        assert!(!shard.frozen);
        assert_eq!(left.shard(), shard);
        for (k, v) in [
            ("a", "before split"),
            ("b", "left"),
            ("n", "right"),
            ("o", "first"),
            ("zz", "right"),
        ] {
            assert_eq!(left.get(k.as_bytes()).unwrap(), Some(v.as_bytes().to_vec()), "{k}");
        }
        // The retried CAS the right shard applied is answered from the cache, not applied again
        // (applied again, it would fail: the key now exists).
        let retry = apply(&mut left, &[cas(session(7, 2, 1), "o", None, "first")]);
        assert_eq!(
            retry,
            vec![WriteResponse::CompareAndSwap {
                succeeded: true,
                current: None
            }]
        );
        // A write the client acknowledged (seq 1) is refused as expired, never re-applied.
        assert_eq!(
            apply(&mut left, &[put(session(7, 1, 1), "n", "again")]),
            vec![WriteResponse::SessionExpired]
        );
        assert_eq!(left.get(b"n").unwrap(), Some(b"right".to_vec()));
        // Client 1's responses from both sides are kept.
        assert_eq!(
            apply(&mut left, &[put(session(1, 2, 0), "p", "again")]),
            vec![WriteResponse::Put]
        );
        assert_eq!(
            left.get(b"p").unwrap(),
            Some(b"right".to_vec()),
            "cached, not re-applied"
        );
        // New writes to the absorbed range apply.
        assert_eq!(apply(&mut left, &[put(None, "q", "new")]), vec![WriteResponse::Put]);
        // The right group's own records are gone from this node, its data is the left's now.
        assert!(engine.get(Cf::Meta, &applied_state_key(RIGHT)).unwrap().is_none());
        assert!(engine.get(Cf::Meta, &replica_key(RIGHT)).unwrap().is_none());
        // The same merge again is refused: the left epoch moved.
        let again = merge_into(&mut left, &merge_cmd(export_of(&right_shard, &engine), 4));
        assert!(matches!(again, WriteResponse::MergeRefused { .. }));

        // The merged state survives a restart.
        let reopened = KvStateMachine::open(
            engine.clone(),
            LEFT,
            ShardState::whole_keyspace(DEFAULT_KEYSPACE, false),
        )
        .unwrap();
        assert_eq!(reopened.shard(), left.shard());
        assert_eq!(reopened.get(b"zz").unwrap(), Some(b"right".to_vec()));
    }

    /// A source for `shard` with no data, for refusals that do not depend on the data.
    fn export_of(shard: &ShardState, _engine: &Arc<MemoryEngine>) -> MergeSource {
        MergeSource {
            shard: shard.clone(),
            kvs: Vec::new(),
            sessions: Vec::new(),
        }
    }

    #[test]
    fn merges_that_do_not_fit_are_refused_and_change_nothing() {
        let engine = MemoryEngine::new();
        let (mut left, mut right) = split_pair(&engine);
        apply(&mut right, &[put(None, "n", "right")]);
        let unfrozen = export_of(right.shard(), &engine);
        apply(&mut right, &[cmd(Command::Freeze { expected_epoch: 2 })]);
        let source = export(&right);
        let before = left.shard().clone();

        let mut refusals = Vec::new();
        // The left side's epoch changed since the merge was planned (it split, say).
        refusals.push(merge_cmd(source.clone(), 1));
        // The right side was never frozen.
        refusals.push(merge_cmd(unfrozen, 2));
        // The ranges are not adjacent: a right side further along.
        let mut far = source.clone();
        far.shard.start = before.data_key(b"t");
        far.kvs.clear();
        refusals.push(merge_cmd(far, 2));
        // A carried key outside the right side's range.
        let mut stray = source.clone();
        stray.kvs.push(MergePair {
            key: before.data_key(b"a"),
            value: b"x".to_vec(),
        });
        refusals.push(merge_cmd(stray, 2));
        // A group absorbing itself.
        refusals.push(cmd(Command::Merge {
            right_group: LEFT,
            expected_left_epoch: 2,
            source: source.clone(),
        }));
        for request in &refusals {
            assert_eq!(left.check_merge(request), None);
            let r = merge_into(&mut left, request);
            assert!(matches!(r, WriteResponse::MergeRefused { .. }), "{request}: {r:?}");
            assert_eq!(left.shard(), &before);
        }
        assert_eq!(left.get(b"a").unwrap(), Some(b"before split".to_vec()));
        assert!(left.get(b"n").is_err(), "the right range is still not the left's");
        assert!(engine.get(Cf::Meta, &replica_key(RIGHT)).unwrap().is_some());
        // A frozen left side absorbs nothing.
        apply(&mut left, &[cmd(Command::Freeze { expected_epoch: 2 })]);
        assert!(matches!(
            merge_into(&mut left, &merge_cmd(source, 3)),
            WriteResponse::MergeRefused { .. }
        ));
    }

    #[test]
    fn an_export_is_bounded() {
        let engine = MemoryEngine::new();
        let (_, mut right) = split_pair(&engine);
        apply(&mut right, &[put(None, "n", &"v".repeat(100))]);
        apply(&mut right, &[cmd(Command::Freeze { expected_epoch: 2 })]);
        assert_eq!(right.export_for_merge(50).unwrap(), MergeExport::TooLarge { limit: 50 });
        assert!(matches!(right.export_for_merge(10_000).unwrap(), MergeExport::Ready(_)));
    }

    #[test]
    fn frozen_and_merged_shards_survive_a_snapshot_round_trip() {
        let engine = MemoryEngine::new();
        let (mut left, mut right) = split_pair(&engine);
        apply(&mut right, &[put(session(3, 1, 0), "n", "right")]);
        apply(&mut right, &[cmd(Command::Freeze { expected_epoch: 2 })]);
        let dir = tempfile::tempdir().unwrap();

        // The frozen right shard, installed elsewhere, is still frozen and still refuses writes.
        let path = dir.path().join("right.snap");
        build_snapshot(&*engine, RIGHT, &path).unwrap();
        let other = MemoryEngine::new();
        let mut copy = KvStateMachine::open(other.clone(), RIGHT, right.shard().clone()).unwrap();
        copy.install_snapshot(&path).unwrap();
        assert_eq!(copy.shard(), right.shard());
        assert!(matches!(
            apply(&mut copy, &[put(None, "o", "1")])[0],
            WriteResponse::WrongShard { .. }
        ));

        // The merged left shard, installed on a replica that never saw the merge, serves the
        // whole range and remembers the right side's sessions.
        merge_into(&mut left, &merge_cmd(export(&right), 2));
        let path = dir.path().join("left.snap");
        build_snapshot(&*engine, LEFT, &path).unwrap();
        let mut behind = KvStateMachine::open(
            other.clone(),
            LEFT,
            ShardState {
                end: right.shard().start.clone(),
                epoch: 2,
                ..left.shard().clone()
            },
        )
        .unwrap();
        let prepared = crate::snapshot::prepare_snapshot(&path, LEFT).unwrap();
        assert_eq!(prepared.shard(), Some(left.shard()));
        behind.install_prepared(prepared).unwrap();
        assert_eq!(behind.shard(), left.shard());
        assert_eq!(behind.get(b"n").unwrap(), Some(b"right".to_vec()));
        assert_eq!(
            apply(&mut behind, &[put(session(3, 1, 0), "n", "twice")]),
            vec![WriteResponse::Put]
        );
        assert_eq!(
            behind.get(b"n").unwrap(),
            Some(b"right".to_vec()),
            "answered from the cache"
        );
    }

    #[test]
    fn a_retired_replica_writes_nothing_more() {
        let engine = MemoryEngine::new();
        let (_, mut right) = split_pair(&engine);
        right.retire();
        let r = put(None, "n", "1");
        let index = next_index(&right);
        let err = right
            .apply(
                &[ApplyEntry {
                    index,
                    request: Some(&r),
                }],
                index,
                vec![],
            )
            .unwrap_err();
        assert!(matches!(err, StorageError::Retired { group: RIGHT }));
        assert_eq!(right.get(b"n").unwrap(), None);
    }
}
