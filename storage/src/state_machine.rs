//! The replicated key-value state machine of one replica group.
//!
//! Committed log entries are applied here, in log order, identically on every replica. The
//! state is the group's data keys (in [`Cf::Data`], under [`keys::data_key`]), its client
//! sessions and its applied state (both in [`Cf::Meta`]).
//!
//! Invariants:
//!
//! * **Atomic apply**: one call to [`KvStateMachine::apply`] is one engine batch holding the
//!   data changes, the session changes and the applied state (index plus the consensus layer's
//!   opaque blob). After a crash the data is therefore exactly the data as of the recorded
//!   applied index, and replaying the log from there is correct. The batch is not synced: the
//!   log is the durable copy, and the engine's prefix durability makes the apply durable with the
//!   next synced write; until then a crash merely rolls the state machine back to an earlier
//!   applied index, which replay fixes.
//! * **Determinism**: the outcome of every entry depends only on the state and the entry
//!   (sessions use log indexes, never clocks), so every replica computes the same responses.
//! * **Read-your-writes inside a batch**: entries see the effects of earlier entries of the same
//!   call through an overlay, since the batch is not in the engine yet.
//! * **Verified reads**: every value is checked against its record checksum; a mismatch is
//!   [`StorageError::Corruption`], never a wrong answer.
//! * **Memory follows disk**: session changes reach the in-memory table only after the batch
//!   was written, so a failed apply leaves both in their previous state.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::engine::{Cf, Engine, EngineRead, KvPair, WriteBatch};
use crate::error::{Result, StorageError};
use crate::keys::{self, applied_state_key, decode_data_key, replica_key, session_key, session_range};
use crate::metrics::StorageMetrics;
use crate::record::{decode_record, encode_record};
use crate::session::{Admission, Session, SessionTable};
use crate::shard::ShardState;

/// Default cap on client sessions per group.
pub const DEFAULT_MAX_SESSIONS: usize = 100_000;

/// The most pairs one scan returns; a limit of 0 or above this means this.
pub const MAX_SCAN_LIMIT: usize = 10_000;

/// A write of the key-value API.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    CompareAndSwap {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// `None` expects the key to be absent.
        #[serde(with = "serde_bytes")]
        expected: Option<Vec<u8>>,
        #[serde(with = "serde_bytes")]
        new_value: Vec<u8>,
    },
    /// Applies `ops` if, and only if, every comparison holds, atomically (etcd's `Txn` without
    /// the else branch). All keys must lie in the group's shard.
    Txn { compares: Vec<Compare>, ops: Vec<TxnOp> },
    /// Hands `[at, end)` of this shard to the new group `new_group`. Applied on its own (see
    /// [`KvStateMachine::apply_split`]); refused unless the shard is still at `expected_epoch`
    /// and `at` lies strictly inside the range.
    Split {
        #[serde(with = "serde_bytes")]
        at: Vec<u8>,
        new_group: u64,
        expected_epoch: u64,
    },
    /// Freezes the shard for a merge into its left neighbour (see [`crate::merge`]): from this
    /// entry on every write is refused with `WrongShard`; the epoch rises by one. Refused unless
    /// the shard is at `expected_epoch`; answered `Frozen` again, changing nothing, when it is
    /// already frozen at `expected_epoch + 1` (a retried freeze).
    Freeze { expected_epoch: u64 },
    /// Lifts a freeze whose merge was abandoned: writes are accepted again and the epoch rises
    /// by one. `frozen_epoch` is the epoch the freeze gave the shard; answered `Unfrozen` again,
    /// changing nothing, when the shard is already unfrozen at `frozen_epoch + 1`.
    Unfreeze { frozen_epoch: u64 },
    /// Takes over the range, data and sessions of `right_group`, the frozen right neighbour
    /// described by `source`. Applied on its own (see [`KvStateMachine::apply_merge`]).
    Merge {
        right_group: u64,
        expected_left_epoch: u64,
        source: crate::merge::MergeSource,
    },
}

/// One comparison of a [`Command::Txn`]: the key holds exactly `expected` (`None`: is absent).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub expected: Option<Vec<u8>>,
}

/// One write of a [`Command::Txn`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum TxnOp {
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
}

impl Command {
    /// The user keys the command touches (comparisons included).
    fn keys(&self) -> Vec<&[u8]> {
        match self {
            Command::Put { key, .. } | Command::Delete { key } | Command::CompareAndSwap { key, .. } => vec![key],
            Command::Txn { compares, ops } => compares
                .iter()
                .map(|c| c.key.as_slice())
                .chain(ops.iter().map(|o| match o {
                    TxnOp::Put { key, .. } | TxnOp::Delete { key } => key.as_slice(),
                }))
                .collect(),
            Command::Split { .. } | Command::Freeze { .. } | Command::Unfreeze { .. } | Command::Merge { .. } => {
                Vec::new()
            }
        }
    }
}

/// A write as replicated through the log.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct WriteRequest {
    /// Without a session a retry may apply twice.
    pub session: Option<Session>,
    pub command: Command,
}

/// A short, size-bounded description for logs and openraft's entry display; never the values,
/// which may be large or sensitive.
impl std::fmt::Display for WriteRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.command {
            Command::Put { key, .. } => write!(f, "put key_len={}", key.len())?,
            Command::Delete { key } => write!(f, "delete key_len={}", key.len())?,
            Command::CompareAndSwap { key, .. } => write!(f, "cas key_len={}", key.len())?,
            Command::Txn { compares, ops } => write!(f, "txn compares={} ops={}", compares.len(), ops.len())?,
            Command::Split {
                new_group,
                expected_epoch,
                ..
            } => write!(f, "split new_group={new_group} epoch={expected_epoch}")?,
            Command::Freeze { expected_epoch } => write!(f, "freeze epoch={expected_epoch}")?,
            Command::Unfreeze { frozen_epoch } => write!(f, "unfreeze epoch={frozen_epoch}")?,
            Command::Merge {
                right_group,
                expected_left_epoch,
                source,
            } => write!(
                f,
                "merge right_group={right_group} epoch={expected_left_epoch} kvs={} sessions={}",
                source.kvs.len(),
                source.sessions.len()
            )?,
        }
        if let Some(s) = &self.session {
            write!(f, " session={}/{}", s.client_id, s.sequence)?;
        }
        Ok(())
    }
}

/// The outcome of one log entry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum WriteResponse {
    Put,
    Delete {
        existed: bool,
    },
    CompareAndSwap {
        succeeded: bool,
        /// The value when the comparison was made; `None` if the key did not exist.
        #[serde(with = "serde_bytes")]
        current: Option<Vec<u8>>,
    },
    /// The request's sequence is `<=` the session's acknowledged point: its outcome was
    /// forgotten, and applying it again could apply it twice.
    SessionExpired,
    Txn {
        succeeded: bool,
    },
    /// A key of the request lies outside the group's shard (it split or merged after the request
    /// was routed). Nothing was applied and the session did not record it, so the client may
    /// send the same write, with the same sequence, to the shard that now holds the key.
    WrongShard {
        shard: ShardState,
    },
    /// The split was applied: this group now serves `left`, the new group `right`.
    Split {
        left: ShardState,
        right: ShardState,
    },
    /// The split was refused (stale epoch, or a split key outside the range); nothing changed.
    SplitRefused {
        shard: ShardState,
        reason: String,
    },
    /// The shard is frozen (now, or already was at the epoch the freeze gives).
    Frozen {
        shard: ShardState,
    },
    /// The shard is no longer frozen.
    Unfrozen {
        shard: ShardState,
    },
    /// The merge was applied: this group now serves `shard`, the union of both ranges.
    Merged {
        shard: ShardState,
    },
    /// A freeze, unfreeze or merge was refused (stale epoch, ranges not adjacent, a right side
    /// that is not frozen, ...); nothing changed. `shard` is this group's shard as it is.
    MergeRefused {
        shard: ShardState,
        reason: String,
    },
    /// Blank and membership entries.
    None,
}

/// One committed entry to apply. `request` is `None` for blank and membership entries.
#[derive(Clone, Copy, Debug)]
pub struct ApplyEntry<'a> {
    pub index: u64,
    pub request: Option<&'a WriteRequest>,
}

/// Tunables of a [`KvStateMachine`].
#[derive(Clone, Debug)]
pub struct StateMachineConfig {
    /// Cap on client sessions; part of the replicated semantics, so it must be equal on every
    /// replica of a group.
    pub max_sessions: usize,
    pub metrics: StorageMetrics,
}

impl Default for StateMachineConfig {
    fn default() -> Self {
        StateMachineConfig {
            max_sessions: DEFAULT_MAX_SESSIONS,
            metrics: StorageMetrics::unregistered(),
        }
    }
}

/// The persisted applied state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub(crate) struct AppliedState {
    pub index: u64,
    #[serde(with = "serde_bytes")]
    pub meta: Vec<u8>,
    /// The shard as of this apply: it moves with the data, atomically.
    pub shard: ShardState,
}

impl AppliedState {
    pub(crate) fn encode(&self) -> Result<Vec<u8>> {
        postcard::to_allocvec(self).map_err(|source| StorageError::Codec {
            context: format!("encoding applied state at index {}", self.index),
            source,
        })
    }

    pub(crate) fn decode(group: u64, payload: &[u8]) -> Result<Self> {
        postcard::from_bytes(payload)
            .map_err(|e| StorageError::corruption(format!("applied state of group {group} does not decode: {e}")))
    }

    pub(crate) fn load(view: &dyn EngineRead, group: u64) -> Result<Option<Self>> {
        let key = applied_state_key(group);
        let Some(stored) = view.get(Cf::Meta, &key)? else {
            return Ok(None);
        };
        Self::decode(group, decode_record(Cf::Meta, &key, &stored)?).map(Some)
    }
}

/// The key-value state of one replica group.
pub struct KvStateMachine {
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) group: u64,
    /// The shard this replica serves: the applied one, or before any apply the one it was opened
    /// for.
    pub(crate) shard: ShardState,
    pub(crate) sessions: SessionTable,
    pub(crate) applied: Option<AppliedState>,
    pub(crate) config: StateMachineConfig,
    /// Set once this replica's group was merged away from this node (see
    /// [`KvStateMachine::retire`]): from then on it writes nothing more to the engine.
    retired: bool,
}

impl KvStateMachine {
    /// Opens the state machine of `group` with default tunables, loading its sessions and
    /// applied state. `shard` is what the replica serves until something is applied (a replica
    /// that has applied anything knows its shard from its applied state).
    pub fn open(engine: Arc<dyn Engine>, group: u64, shard: ShardState) -> Result<Self> {
        Self::open_with(engine, group, shard, StateMachineConfig::default())
    }

    /// [`KvStateMachine::open`] with explicit tunables.
    pub fn open_with(
        engine: Arc<dyn Engine>,
        group: u64,
        shard: ShardState,
        config: StateMachineConfig,
    ) -> Result<Self> {
        shard.validate()?;
        if config.max_sessions == 0 {
            return Err(StorageError::InvalidArgument(
                "max_sessions must be at least 1: sessions are how retries apply once".into(),
            ));
        }
        let mut sm = KvStateMachine {
            engine,
            group,
            shard,
            sessions: SessionTable::new(config.max_sessions),
            applied: None,
            config,
            retired: false,
        };
        sm.reload()?;
        Ok(sm)
    }

    /// Reloads sessions and applied state from one consistent view of the engine.
    pub(crate) fn reload(&mut self) -> Result<()> {
        let (group, max_sessions) = (self.group, self.config.max_sessions);
        let mut loaded = None;
        self.engine
            .with_snapshot(&mut |view| {
                loaded = Some((
                    SessionTable::load(view, group, max_sessions)?,
                    AppliedState::load(view, group)?,
                ));
                Ok(())
            })
            .map_err(|e| self.config.metrics.observe_error(e))?;
        let (sessions, applied) = loaded.expect("with_snapshot runs the closure exactly once when it returns Ok");
        self.sessions = sessions;
        if let Some(a) = &applied {
            self.shard = a.shard.clone();
        }
        self.applied = applied;
        Ok(())
    }

    pub fn group(&self) -> u64 {
        self.group
    }

    pub fn keyspace(&self) -> u32 {
        self.shard.keyspace
    }

    /// The shard this replica serves now.
    pub fn shard(&self) -> &ShardState {
        &self.shard
    }

    pub(crate) fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// The consensus layer's blob stored with the last apply (its last applied log id and
    /// membership); `None` before the first apply.
    pub fn applied_meta(&self) -> Option<&[u8]> {
        self.applied.as_ref().map(|a| a.meta.as_slice())
    }

    /// The index given to the last apply; 0 before the first. Index 0 can be a real log index,
    /// so use [`KvStateMachine::applied_meta`] to tell "nothing applied" apart.
    pub fn applied_index(&self) -> u64 {
        self.applied.as_ref().map_or(0, |a| a.index)
    }

    /// Number of client sessions held.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Applies `entries` in order as ONE engine write (not synced: see the module docs) that
    /// also stores `applied_index` and `applied_meta`. Returns one response per entry.
    ///
    /// Entry indexes must increase and lie above the current applied index and at or below
    /// `applied_index`, which may not move backwards.
    pub fn apply(
        &mut self,
        entries: &[ApplyEntry<'_>],
        applied_index: u64,
        applied_meta: Vec<u8>,
    ) -> Result<Vec<WriteResponse>> {
        self.check_live()?;
        self.check_indexes(entries, applied_index)?;

        let mut batch = WriteBatch::new();
        let mut overlay: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
        let mut txn = self.sessions.begin();
        let mut responses = Vec::with_capacity(entries.len());
        // The shard as the entries of this batch see it (a freeze changes it for the entries
        // after it); it replaces `self.shard` only once the batch is written.
        let mut shard = self.shard.clone();
        for entry in entries {
            let Some(request) = entry.request else {
                responses.push(WriteResponse::None);
                continue;
            };
            match &request.command {
                Command::Split { .. } | Command::Merge { .. } => {
                    return Err(StorageError::InvalidArgument(format!(
                        "group {}: a split or merge (entry {}) must be applied alone, with apply_split or apply_merge",
                        self.group, entry.index
                    )));
                }
                // Sessionless by nature: the driver that sends them repeats them on purpose,
                // and each is idempotent on its own.
                Command::Freeze { .. } | Command::Unfreeze { .. } => {
                    responses.push(crate::merge::apply_freeze(&mut shard, &request.command));
                    continue;
                }
                _ => {}
            }
            // Checked before the session is consulted: a write refused here was not applied, so
            // it must not be remembered as answered either. A frozen shard refuses every write
            // the same way, so the client retries it where the merge moves the range.
            if shard.frozen || request.command.keys().iter().any(|k| !shard.contains_user_key(k)) {
                responses.push(WriteResponse::WrongShard { shard: shard.clone() });
                continue;
            }
            if let Some(session) = &request.session {
                match txn.admit(session, entry.index) {
                    Admission::Apply => {}
                    Admission::Cached(response) => {
                        responses.push(response);
                        continue;
                    }
                    Admission::Expired => {
                        responses.push(WriteResponse::SessionExpired);
                        continue;
                    }
                }
            }
            let response = self
                .execute(&request.command, &mut overlay, &mut batch)
                .map_err(|e| self.config.metrics.observe_error(e))?;
            if let Some(session) = &request.session {
                txn.record(session, response.clone());
            }
            responses.push(response);
        }
        let changes = txn.finish(self.group, &mut batch)?;

        let applied = AppliedState {
            index: applied_index,
            meta: applied_meta,
            shard,
        };
        put_applied(&mut batch, self.group, &applied)?;
        self.engine.write(batch, false)?;

        self.sessions.commit(changes);
        self.shard = applied.shard.clone();
        self.applied = Some(applied);
        Ok(responses)
    }

    /// Applies a [`Command::Split`] at `index`, alone, as one engine write: this group's shard
    /// shrinks to `[start, at)` with a new epoch, and the new group is born holding `[at, end)`
    /// with the same epoch. The new group needs no data copied: its keys are already in the
    /// engine, untouched from here on, since this group refuses them from this entry on. Written
    /// in the same batch, so a crash leaves either no split or the whole of it:
    /// - the new group's applied state at index 0 with `new_group_meta` (the consensus layer's
    ///   description of that state: its first log id and its membership, the parent's), so it
    ///   starts as a replica that has applied its initial state and never replays anything;
    /// - a copy of this group's client sessions, so that a write applied here before the split
    ///   and retried after it is recognised by the new group and not applied twice;
    /// - the new group's entry in the node's replica list.
    ///
    /// Every replica of this group applies the same entry, so the new group is born identical on
    /// every node that holds this group.
    pub fn apply_split(
        &mut self,
        index: u64,
        request: &WriteRequest,
        applied_meta: Vec<u8>,
        new_group_meta: Vec<u8>,
    ) -> Result<WriteResponse> {
        self.check_live()?;
        self.check_indexes(&[ApplyEntry { index, request: None }], index)?;
        let Command::Split {
            at,
            new_group,
            expected_epoch,
        } = &request.command
        else {
            return Err(StorageError::InvalidArgument(format!(
                "group {}: apply_split given a non-split entry {index}",
                self.group
            )));
        };
        let mut batch = WriteBatch::new();
        let refused = if *expected_epoch != self.shard.epoch {
            Some(format!(
                "shard epoch is {}, the split expected {expected_epoch}",
                self.shard.epoch
            ))
        } else if !(self.shard.start.as_slice() < at.as_slice() && at.as_slice() < self.shard.end.as_slice()) {
            Some("the split key does not lie strictly inside the shard".to_string())
        } else if *new_group == self.group {
            Some("the new group must differ from the splitting one".to_string())
        } else if self.shard.frozen {
            Some("the shard is frozen for a merge".to_string())
        } else {
            None
        };
        let (response, shard) = match refused {
            Some(reason) => (
                WriteResponse::SplitRefused {
                    shard: self.shard.clone(),
                    reason,
                },
                self.shard.clone(),
            ),
            None => {
                let (left, right) = self.shard.split(at.clone());
                let born = AppliedState {
                    index: 0,
                    meta: new_group_meta,
                    shard: right.clone(),
                };
                put_applied(&mut batch, *new_group, &born)?;
                let (start, end) = session_range(self.group);
                for item in self.engine.scan(Cf::Meta, &start, Some(&end))? {
                    let (key, stored) = item?;
                    let client_id = keys::decode_session_key(self.group, &key)?;
                    let session = decode_record(Cf::Meta, &key, &stored)?;
                    let new_key = session_key(*new_group, client_id);
                    let record = encode_record(&new_key, session);
                    batch.put(Cf::Meta, new_key, record);
                }
                let rkey = replica_key(*new_group);
                let record = encode_record(&rkey, &right.encode()?);
                batch.put(Cf::Meta, rkey, record);
                (
                    WriteResponse::Split {
                        left: left.clone(),
                        right,
                    },
                    left,
                )
            }
        };
        let applied = AppliedState {
            index,
            meta: applied_meta,
            shard,
        };
        put_applied(&mut batch, self.group, &applied)?;
        self.engine.write(batch, false)?;
        self.shard = applied.shard.clone();
        self.applied = Some(applied);
        Ok(response)
    }

    /// Fences this replica off the engine for good: every later apply or snapshot install fails
    /// with [`StorageError::Retired`] and writes nothing. The node calls it when the group was
    /// merged away from this node, after which another local replica owns the range; taking the
    /// exclusive lock to set it waits out any write in progress, so none can follow it.
    pub fn retire(&mut self) {
        self.retired = true;
    }

    pub(crate) fn check_live(&self) -> Result<()> {
        if self.retired {
            return Err(StorageError::Retired { group: self.group });
        }
        Ok(())
    }

    pub(crate) fn check_indexes(&self, entries: &[ApplyEntry<'_>], applied_index: u64) -> Result<()> {
        let mut floor = self.applied.as_ref().map(|a| a.index);
        if let Some(current) = floor {
            if applied_index < current {
                return Err(StorageError::InvalidArgument(format!(
                    "group {}: applied index would move back from {current} to {applied_index}",
                    self.group
                )));
            }
        }
        for entry in entries {
            if floor.is_some_and(|f| entry.index <= f) || entry.index > applied_index {
                return Err(StorageError::InvalidArgument(format!(
                    "group {}: entry {} is out of order (after {floor:?}, applying through {applied_index})",
                    self.group, entry.index
                )));
            }
            floor = Some(entry.index);
        }
        Ok(())
    }

    fn execute(
        &self,
        command: &Command,
        overlay: &mut HashMap<Vec<u8>, Option<Vec<u8>>>,
        batch: &mut WriteBatch,
    ) -> Result<WriteResponse> {
        let response = match command {
            Command::Put { key, value } => {
                let dk = self.shard.data_key(key);
                put(overlay, batch, dk, value);
                WriteResponse::Put
            }
            Command::Delete { key } => {
                let dk = self.shard.data_key(key);
                let value = self.current(overlay, &dk)?;
                batch.delete(Cf::Data, dk.clone());
                overlay.insert(dk, None);
                WriteResponse::Delete {
                    existed: value.is_some(),
                }
            }
            Command::CompareAndSwap {
                key,
                expected,
                new_value,
            } => {
                let dk = self.shard.data_key(key);
                let value = self.current(overlay, &dk)?;
                let succeeded = value == *expected;
                if succeeded {
                    put(overlay, batch, dk, new_value);
                }
                WriteResponse::CompareAndSwap {
                    succeeded,
                    current: value,
                }
            }
            Command::Txn { compares, ops } => {
                for c in compares {
                    if self.current(overlay, &self.shard.data_key(&c.key))? != c.expected {
                        return Ok(WriteResponse::Txn { succeeded: false });
                    }
                }
                for op in ops {
                    match op {
                        TxnOp::Put { key, value } => put(overlay, batch, self.shard.data_key(key), value),
                        TxnOp::Delete { key } => {
                            let dk = self.shard.data_key(key);
                            batch.delete(Cf::Data, dk.clone());
                            overlay.insert(dk, None);
                        }
                    }
                }
                WriteResponse::Txn { succeeded: true }
            }
            Command::Split { .. } | Command::Freeze { .. } | Command::Unfreeze { .. } | Command::Merge { .. } => {
                unreachable!("apply() handles split, freeze, unfreeze and merge entries before executing anything")
            }
        };
        Ok(response)
    }

    /// The value of data key `dk` as seen by the entry being applied: the batch's own pending
    /// writes first, then the engine.
    fn current(&self, overlay: &HashMap<Vec<u8>, Option<Vec<u8>>>, dk: &[u8]) -> Result<Option<Vec<u8>>> {
        match overlay.get(dk) {
            Some(pending) => Ok(pending.clone()),
            None => self.read_data(dk),
        }
    }

    fn read_data(&self, dk: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.engine.get(Cf::Data, dk)? {
            None => Ok(None),
            Some(stored) => Ok(Some(decode_record(Cf::Data, dk, &stored)?.to_vec())),
        }
    }

    /// The value of `key`, verified. A key outside the shard is [`StorageError::WrongShard`].
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if !self.shard.contains_user_key(key) {
            return Err(StorageError::WrongShard(Box::new(self.shard.clone())));
        }
        self.read_data(&self.shard.data_key(key))
            .map_err(|e| self.config.metrics.observe_error(e))
    }

    /// Pairs with user keys in `[start, end)` (`end = None`: to the end of the shard) within this
    /// shard, at most `limit` of them; the flag is true when the scan continues (more pairs, or
    /// the range goes on in the next shard).
    pub fn scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<(Vec<KvPair>, bool)> {
        let page = self.scan_shard(&ShardScan {
            cursor: None,
            start: start.to_vec(),
            end: end.map(<[u8]>::to_vec),
            limit,
        })?;
        Ok((page.kvs, page.cursor.is_some()))
    }

    /// One shard's part of a scan (see [`ShardScan`]). A position outside the shard is
    /// [`StorageError::WrongShard`].
    pub fn scan_shard(&self, scan: &ShardScan) -> Result<ShardScanPage> {
        self.scan_shard_inner(scan)
            .map_err(|e| self.config.metrics.observe_error(e))
    }

    fn scan_shard_inner(&self, scan: &ShardScan) -> Result<ShardScanPage> {
        let shard = &self.shard;
        let position = shard.scan_position(scan.cursor.as_deref(), &scan.start);
        if !shard.contains(&position) {
            return Err(StorageError::WrongShard(Box::new(shard.clone())));
        }
        let limit = if scan.limit == 0 {
            MAX_SCAN_LIMIT
        } else {
            scan.limit.min(MAX_SCAN_LIMIT)
        };
        // The encoded end of the requested range: for a range keyspace the end key itself; for a
        // hash keyspace the keyspace's end, since user keys are spread over every hash value.
        let requested_end = match (&scan.end, shard.hashed) {
            (Some(end), false) => shard.data_key(end),
            _ => keys::keyspace_range(shard.keyspace).1,
        };
        let to = requested_end.clone().min(shard.end.clone());
        let mut kvs = Vec::new();
        if position < to {
            for item in self.engine.scan(Cf::Data, &position, Some(&to))? {
                let (key, value) = item?;
                let user_key = decode_data_key(shard.keyspace, shard.prefix_len(), &key)?;
                if shard.hashed && !scan.user_range_contains(&user_key) {
                    continue;
                }
                if kvs.len() == limit {
                    return Ok(ShardScanPage { kvs, cursor: Some(key) });
                }
                let value = decode_record(Cf::Data, &key, &value)?.to_vec();
                kvs.push((user_key, value));
            }
        }
        // This shard is exhausted; the range continues in the next shard if it ends later.
        let cursor = (shard.end < requested_end).then(|| shard.end.clone());
        Ok(ShardScanPage { kvs, cursor })
    }
}

/// A request for one shard's part of a scan. `start`/`end` are user keys (`end = None`: no upper
/// bound); `cursor` is the encoded position a previous page stopped at.
#[derive(Clone, Debug, Default)]
pub struct ShardScan {
    pub cursor: Option<Vec<u8>>,
    pub start: Vec<u8>,
    pub end: Option<Vec<u8>>,
    /// 0 or above [`MAX_SCAN_LIMIT`] means `MAX_SCAN_LIMIT`.
    pub limit: usize,
}

impl ShardScan {
    fn user_range_contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && self.end.as_deref().is_none_or(|e| key < e)
    }
}

/// One page of a shard scan: pairs in stored order (key order on a range keyspace, hash order
/// on a hash keyspace), and where the scan continues (`None`: the range is exhausted). The
/// cursor may lie in another shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardScanPage {
    pub kvs: Vec<KvPair>,
    pub cursor: Option<Vec<u8>>,
}

pub(crate) fn put_applied(batch: &mut WriteBatch, group: u64, applied: &AppliedState) -> Result<()> {
    let key = applied_state_key(group);
    let record = encode_record(&key, &applied.encode()?);
    batch.put(Cf::Meta, key, record);
    Ok(())
}

pub(crate) fn put(overlay: &mut HashMap<Vec<u8>, Option<Vec<u8>>>, batch: &mut WriteBatch, dk: Vec<u8>, value: &[u8]) {
    batch.put(Cf::Data, dk.clone(), encode_record(&dk, value));
    overlay.insert(dk, Some(value.to_vec()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{MemoryEngine, RocksEngine};
    use crate::keys::DEFAULT_KEYSPACE;

    const GROUP: u64 = 3;

    fn open(engine: &Arc<MemoryEngine>) -> KvStateMachine {
        KvStateMachine::open(
            engine.clone(),
            GROUP,
            ShardState::whole_keyspace(DEFAULT_KEYSPACE, false),
        )
        .unwrap()
    }

    fn req(session: Option<(u64, u64, u64)>, command: Command) -> WriteRequest {
        WriteRequest {
            session: session.map(|(client_id, sequence, acked_through)| Session {
                client_id,
                sequence,
                acked_through,
            }),
            command,
        }
    }

    fn put_cmd(k: &str, v: &str) -> Command {
        Command::Put {
            key: k.into(),
            value: v.into(),
        }
    }

    fn cas(k: &str, expected: Option<&str>, new: &str) -> Command {
        Command::CompareAndSwap {
            key: k.into(),
            expected: expected.map(Into::into),
            new_value: new.into(),
        }
    }

    /// Applies each request as its own entry, at consecutive indexes after the current one.
    fn apply(sm: &mut KvStateMachine, requests: &[WriteRequest]) -> Vec<WriteResponse> {
        let first = sm.applied_meta().map_or(1, |_| sm.applied_index() + 1);
        let entries: Vec<ApplyEntry<'_>> = requests
            .iter()
            .enumerate()
            .map(|(i, r)| ApplyEntry {
                index: first + i as u64,
                request: Some(r),
            })
            .collect();
        let last = first + requests.len() as u64 - 1;
        sm.apply(&entries, last, format!("meta@{last}").into_bytes()).unwrap()
    }

    #[test]
    fn put_get_delete_and_cas() {
        let engine = MemoryEngine::new();
        let mut sm = open(&engine);
        assert_eq!(sm.applied_meta(), None);
        let responses = apply(
            &mut sm,
            &[
                req(None, put_cmd("a", "1")),
                req(
                    None,
                    Command::Delete {
                        key: b"missing".to_vec(),
                    },
                ),
                req(None, cas("a", Some("1"), "2")),
                req(None, cas("a", Some("1"), "3")),
                req(None, cas("b", None, "new")),
            ],
        );
        assert_eq!(
            responses,
            vec![
                WriteResponse::Put,
                WriteResponse::Delete { existed: false },
                WriteResponse::CompareAndSwap {
                    succeeded: true,
                    current: Some(b"1".to_vec())
                },
                WriteResponse::CompareAndSwap {
                    succeeded: false,
                    current: Some(b"2".to_vec())
                },
                WriteResponse::CompareAndSwap {
                    succeeded: true,
                    current: None
                },
            ]
        );
        assert_eq!(sm.get(b"a").unwrap(), Some(b"2".to_vec()));
        assert_eq!(sm.get(b"b").unwrap(), Some(b"new".to_vec()));
        assert_eq!(sm.applied_index(), 5);
        assert_eq!(sm.applied_meta(), Some(&b"meta@5"[..]));
        let responses = apply(&mut sm, &[req(None, Command::Delete { key: b"a".to_vec() })]);
        assert_eq!(responses, vec![WriteResponse::Delete { existed: true }]);
        assert_eq!(sm.get(b"a").unwrap(), None);
    }

    #[test]
    fn a_batch_reads_its_own_writes() {
        let engine = MemoryEngine::new();
        let mut sm = open(&engine);
        let writes = engine.write_count();
        let responses = apply(
            &mut sm,
            &[
                req(None, put_cmd("k", "1")),
                req(None, cas("k", Some("1"), "2")),
                req(None, Command::Delete { key: b"k".to_vec() }),
                req(None, cas("k", None, "3")),
            ],
        );
        assert_eq!(engine.write_count(), writes + 1, "one batch, one engine write");
        assert_eq!(
            responses[1],
            WriteResponse::CompareAndSwap {
                succeeded: true,
                current: Some(b"1".to_vec())
            }
        );
        assert_eq!(responses[2], WriteResponse::Delete { existed: true });
        assert_eq!(
            responses[3],
            WriteResponse::CompareAndSwap {
                succeeded: true,
                current: None
            }
        );
        assert_eq!(sm.get(b"k").unwrap(), Some(b"3".to_vec()));
    }

    #[test]
    fn retried_cas_returns_the_original_success_and_applies_once() {
        let engine = MemoryEngine::new();
        let mut sm = open(&engine);
        apply(&mut sm, &[req(None, put_cmd("k", "old"))]);
        let attempt = req(Some((42, 1, 0)), cas("k", Some("old"), "new"));
        let first = apply(&mut sm, std::slice::from_ref(&attempt));
        // Someone else writes in between; the retry must neither re-apply nor fail.
        apply(&mut sm, &[req(None, put_cmd("k", "other"))]);
        let retry = apply(&mut sm, std::slice::from_ref(&attempt));
        let success = WriteResponse::CompareAndSwap {
            succeeded: true,
            current: Some(b"old".to_vec()),
        };
        assert_eq!(first, vec![success.clone()]);
        assert_eq!(retry, vec![success.clone()]);
        assert_eq!(sm.get(b"k").unwrap(), Some(b"other".to_vec()));

        // The cached response survives a restart (sessions are persisted with the data).
        engine.sync().unwrap();
        engine.crash();
        let mut sm = open(&engine);
        assert_eq!(apply(&mut sm, std::slice::from_ref(&attempt)), vec![success]);

        // Once acknowledged, the outcome is forgotten and a late retry is refused.
        apply(&mut sm, &[req(Some((42, 2, 1)), put_cmd("x", "1"))]);
        assert_eq!(apply(&mut sm, &[attempt]), vec![WriteResponse::SessionExpired]);
        assert_eq!(sm.get(b"k").unwrap(), Some(b"other".to_vec()));
    }

    #[test]
    fn retries_inside_one_batch_apply_once() {
        let engine = MemoryEngine::new();
        let mut sm = open(&engine);
        let attempt = req(Some((7, 1, 0)), cas("c", None, "1"));
        let responses = apply(&mut sm, &[attempt.clone(), attempt]);
        assert_eq!(responses[0], responses[1]);
        assert_eq!(
            responses[0],
            WriteResponse::CompareAndSwap {
                succeeded: true,
                current: None
            }
        );
    }

    #[test]
    fn blank_entries_answer_none_and_advance_applied() {
        let engine = MemoryEngine::new();
        let mut sm = open(&engine);
        let responses = sm
            .apply(
                &[ApplyEntry {
                    index: 0,
                    request: None,
                }],
                0,
                b"membership".to_vec(),
            )
            .unwrap();
        assert_eq!(responses, vec![WriteResponse::None]);
        assert_eq!(sm.applied_meta(), Some(&b"membership"[..]));
        let err = sm
            .apply(
                &[ApplyEntry {
                    index: 0,
                    request: None,
                }],
                0,
                vec![],
            )
            .unwrap_err();
        assert!(matches!(err, StorageError::InvalidArgument(_)), "re-applied index 0");
    }

    #[test]
    fn applied_state_is_atomic_with_data_across_a_crash() {
        let engine = MemoryEngine::new();
        let mut sm = open(&engine);
        apply(
            &mut sm,
            &[req(None, put_cmd("a", "1")), req(Some((1, 1, 0)), put_cmd("b", "1"))],
        );
        engine.sync().unwrap(); // as the next log append would
        apply(
            &mut sm,
            &[req(None, put_cmd("a", "2")), req(Some((2, 1, 0)), put_cmd("c", "1"))],
        );
        assert_eq!(sm.applied_index(), 4);

        engine.crash();
        let sm = open(&engine);
        assert_eq!(sm.applied_index(), 2);
        assert_eq!(sm.applied_meta(), Some(&b"meta@2"[..]));
        assert_eq!(sm.get(b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(sm.get(b"c").unwrap(), None);
        assert_eq!(sm.session_count(), 1, "session of the lost apply is gone too");
    }

    #[test]
    fn a_corrupt_value_is_detected_never_returned() {
        let engine = MemoryEngine::new();
        let metrics = StorageMetrics::unregistered();
        let config = StateMachineConfig {
            metrics: metrics.clone(),
            ..Default::default()
        };
        let mut sm = KvStateMachine::open_with(
            engine.clone(),
            GROUP,
            ShardState::whole_keyspace(DEFAULT_KEYSPACE, false),
            config,
        )
        .unwrap();
        apply(
            &mut sm,
            &[req(None, put_cmd("a", "value")), req(None, put_cmd("b", "fine"))],
        );

        let dk = crate::keys::data_key(DEFAULT_KEYSPACE, &[], b"a");
        let mut stored = engine.get(Cf::Data, &dk).unwrap().unwrap();
        stored[6] ^= 0x20; // first payload byte: 'v' -> 'V'
        let mut batch = WriteBatch::new();
        batch.put(Cf::Data, dk, stored);
        engine.write(batch, false).unwrap();

        assert!(sm.get(b"a").unwrap_err().is_corruption());
        assert!(sm.scan(b"", None, 10).unwrap_err().is_corruption());
        let err = sm
            .apply(
                &[ApplyEntry {
                    index: 3,
                    request: Some(&req(None, cas("a", Some("value"), "x"))),
                }],
                3,
                vec![],
            )
            .unwrap_err();
        assert!(err.is_corruption());
        assert_eq!(sm.applied_index(), 2, "failed apply changed nothing");
        assert_eq!(sm.get(b"b").unwrap(), Some(b"fine".to_vec()));
        assert_eq!(metrics.corruptions.get(), 3);
    }

    #[test]
    fn scan_is_ordered_bounded_and_paged() {
        let engine = MemoryEngine::new();
        let mut sm = open(&engine);
        let keys = ["", "a", "a\0", "a\0b", "ab", "b", "\u{ff}"];
        let requests: Vec<_> = keys.iter().map(|k| req(None, put_cmd(k, k))).collect();
        apply(&mut sm, &requests);
        // Another keyspace on the same engine must not leak into scans.
        let mut other = KvStateMachine::open(
            engine.clone(),
            GROUP + 1,
            ShardState::whole_keyspace(DEFAULT_KEYSPACE + 1, false),
        )
        .unwrap();
        apply(&mut other, &[req(None, put_cmd("a", "other"))]);

        let (all, more) = sm.scan(b"", None, 0).unwrap();
        let got: Vec<&[u8]> = all.iter().map(|(k, _)| k.as_slice()).collect();
        let mut want: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        want.sort();
        assert_eq!(got, want);
        assert!(!more);

        let (page, more) = sm.scan(b"a", Some(b"b"), 2).unwrap();
        assert_eq!(
            page,
            vec![(b"a".to_vec(), b"a".to_vec()), (b"a\0".to_vec(), b"a\0".to_vec())]
        );
        assert!(more);
        let (page, more) = sm.scan(b"a\0\0", Some(b"b"), 2).unwrap();
        assert_eq!(
            page.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
            vec![b"a\0b".to_vec(), b"ab".to_vec()]
        );
        assert!(!more);
        assert_eq!(sm.scan(b"b", Some(b"a"), 5).unwrap(), (vec![], false));
    }

    #[test]
    fn eviction_is_deterministic_across_replicas() {
        let config = || StateMachineConfig {
            max_sessions: 3,
            ..Default::default()
        };
        let a_engine = MemoryEngine::new();
        let dir = tempfile::tempdir().unwrap();
        let b_engine = RocksEngine::open(dir.path()).unwrap();
        let mut a = KvStateMachine::open_with(
            a_engine.clone(),
            GROUP,
            ShardState::whole_keyspace(DEFAULT_KEYSPACE, false),
            config(),
        )
        .unwrap();
        let mut b = KvStateMachine::open_with(
            b_engine.clone(),
            GROUP,
            ShardState::whole_keyspace(DEFAULT_KEYSPACE, false),
            config(),
        )
        .unwrap();
        let requests: Vec<WriteRequest> = [5u64, 1, 9, 5, 7, 3, 1]
            .iter()
            .enumerate()
            .map(|(i, c)| req(Some((*c, i as u64 + 1, 0)), put_cmd("k", "v")))
            .collect();
        for chunk in requests.chunks(2) {
            assert_eq!(apply(&mut a, chunk), apply(&mut b, chunk));
        }
        let ids = |e: &dyn EngineRead| -> Vec<u64> {
            let (start, end) = keys::session_range(GROUP);
            e.scan(Cf::Meta, &start, Some(&end))
                .unwrap()
                .map(|r| keys::decode_session_key(GROUP, &r.unwrap().0).unwrap())
                .collect()
        };
        // Last uses: 5@4, 7@5, 3@6, 1@7 -> 5 is least recently used and evicted.
        assert_eq!(ids(&*a_engine), vec![1, 3, 7]);
        assert_eq!(ids(&*b_engine), vec![1, 3, 7]);
        assert_eq!(a.session_count(), 3);
        // A client the group no longer knows starts afresh (see `session`'s module docs for the
        // gap this leaves after an eviction), and both replicas decide it the same way.
        let late = req(Some((5, 9, 4)), put_cmd("k", "late"));
        let (ra, rb) = (
            apply(&mut a, std::slice::from_ref(&late)),
            apply(&mut b, std::slice::from_ref(&late)),
        );
        assert_eq!(ra, vec![WriteResponse::Put]);
        assert_eq!(ra, rb);
        assert_eq!(ids(&*a_engine), ids(&*b_engine));
    }

    #[test]
    fn rejects_bad_configuration_and_order() {
        let engine = MemoryEngine::new();
        let config = StateMachineConfig {
            max_sessions: 0,
            ..Default::default()
        };
        assert!(KvStateMachine::open_with(
            engine.clone(),
            GROUP,
            ShardState::whole_keyspace(DEFAULT_KEYSPACE, false),
            config
        )
        .is_err());
        assert!(KvStateMachine::open(
            engine.clone(),
            GROUP,
            ShardState {
                keyspace: u32::MAX,
                ..ShardState::whole_keyspace(1, false)
            }
        )
        .is_err());
        let mut sm = open(&engine);
        let r = req(None, put_cmd("a", "1"));
        let entries = [
            ApplyEntry {
                index: 5,
                request: Some(&r),
            },
            ApplyEntry {
                index: 5,
                request: Some(&r),
            },
        ];
        assert!(sm.apply(&entries, 5, vec![]).is_err());
        assert!(
            sm.apply(&entries[..1], 4, vec![]).is_err(),
            "entry beyond applied_index"
        );
        assert_eq!(sm.get(b"a").unwrap(), None);
    }
}
