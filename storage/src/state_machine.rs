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
use crate::keys::{self, applied_state_key, data_key, decode_data_key, keyspace_range};
use crate::metrics::StorageMetrics;
use crate::record::{decode_record, encode_record};
use crate::session::{Admission, Session, SessionTable};

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
        let (op, key) = match &self.command {
            Command::Put { key, .. } => ("put", key),
            Command::Delete { key } => ("delete", key),
            Command::CompareAndSwap { key, .. } => ("cas", key),
        };
        write!(f, "{op} key_len={}", key.len())?;
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
    engine: Arc<dyn Engine>,
    group: u64,
    keyspace: u32,
    /// `[start, end)` of the group's data keys.
    range: (Vec<u8>, Vec<u8>),
    sessions: SessionTable,
    applied: Option<AppliedState>,
    config: StateMachineConfig,
}

impl KvStateMachine {
    /// Opens the state machine of `group` over `keyspace` with default tunables, loading its
    /// sessions and applied state.
    pub fn open(engine: Arc<dyn Engine>, group: u64, keyspace: u32) -> Result<Self> {
        Self::open_with(engine, group, keyspace, StateMachineConfig::default())
    }

    /// [`KvStateMachine::open`] with explicit tunables.
    pub fn open_with(engine: Arc<dyn Engine>, group: u64, keyspace: u32, config: StateMachineConfig) -> Result<Self> {
        if keyspace > keys::MAX_KEYSPACE {
            return Err(StorageError::InvalidArgument(format!(
                "keyspace {keyspace} is reserved"
            )));
        }
        if config.max_sessions == 0 {
            return Err(StorageError::InvalidArgument(
                "max_sessions must be at least 1: sessions are how retries apply once".into(),
            ));
        }
        let mut sm = KvStateMachine {
            engine,
            group,
            keyspace,
            range: keyspace_range(keyspace),
            sessions: SessionTable::new(config.max_sessions),
            applied: None,
            config,
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
        self.applied = applied;
        Ok(())
    }

    pub fn group(&self) -> u64 {
        self.group
    }

    pub fn keyspace(&self) -> u32 {
        self.keyspace
    }

    pub(crate) fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    pub(crate) fn data_range(&self) -> &(Vec<u8>, Vec<u8>) {
        &self.range
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
        self.check_indexes(entries, applied_index)?;

        let mut batch = WriteBatch::new();
        let mut overlay: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
        let mut txn = self.sessions.begin();
        let mut responses = Vec::with_capacity(entries.len());
        for entry in entries {
            let Some(request) = entry.request else {
                responses.push(WriteResponse::None);
                continue;
            };
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
        };
        let key = applied_state_key(self.group);
        let record = encode_record(&key, &applied.encode()?);
        batch.put(Cf::Meta, key, record);
        self.engine.write(batch, false)?;

        self.sessions.commit(changes);
        self.applied = Some(applied);
        Ok(responses)
    }

    fn check_indexes(&self, entries: &[ApplyEntry<'_>], applied_index: u64) -> Result<()> {
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
                let dk = data_key(self.keyspace, &[], key);
                put(overlay, batch, dk, value);
                WriteResponse::Put
            }
            Command::Delete { key } => {
                let dk = data_key(self.keyspace, &[], key);
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
                let dk = data_key(self.keyspace, &[], key);
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

    /// The value of `key`, verified.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.read_data(&data_key(self.keyspace, &[], key))
            .map_err(|e| self.config.metrics.observe_error(e))
    }

    /// Pairs with keys in `[start, end)` (`end = None`: to the end of the keyspace) in
    /// ascending key order, at most `limit` of them (0 or above [`MAX_SCAN_LIMIT`] means
    /// `MAX_SCAN_LIMIT`), from one consistent view. The flag is true when more pairs follow.
    pub fn scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<(Vec<KvPair>, bool)> {
        self.scan_inner(start, end, limit)
            .map_err(|e| self.config.metrics.observe_error(e))
    }

    fn scan_inner(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<(Vec<KvPair>, bool)> {
        let limit = if limit == 0 {
            MAX_SCAN_LIMIT
        } else {
            limit.min(MAX_SCAN_LIMIT)
        };
        let from = data_key(self.keyspace, &[], start);
        let to = match end {
            Some(end) => data_key(self.keyspace, &[], end),
            None => self.range.1.clone(),
        };
        let mut out = Vec::new();
        if from >= to {
            return Ok((out, false));
        }
        for item in self.engine.scan(Cf::Data, &from, Some(&to))? {
            let (key, value) = item?;
            if out.len() == limit {
                return Ok((out, true));
            }
            let user_key = decode_data_key(self.keyspace, 0, &key)?;
            let value = decode_record(Cf::Data, &key, &value)?.to_vec();
            out.push((user_key, value));
        }
        Ok((out, false))
    }
}

fn put(overlay: &mut HashMap<Vec<u8>, Option<Vec<u8>>>, batch: &mut WriteBatch, dk: Vec<u8>, value: &[u8]) {
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
        KvStateMachine::open(engine.clone(), GROUP, DEFAULT_KEYSPACE).unwrap()
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
        let mut sm = KvStateMachine::open_with(engine.clone(), GROUP, DEFAULT_KEYSPACE, config).unwrap();
        apply(
            &mut sm,
            &[req(None, put_cmd("a", "value")), req(None, put_cmd("b", "fine"))],
        );

        let dk = data_key(DEFAULT_KEYSPACE, &[], b"a");
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
        let mut other = KvStateMachine::open(engine.clone(), GROUP + 1, DEFAULT_KEYSPACE + 1).unwrap();
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
        let mut a = KvStateMachine::open_with(a_engine.clone(), GROUP, DEFAULT_KEYSPACE, config()).unwrap();
        let mut b = KvStateMachine::open_with(b_engine.clone(), GROUP, DEFAULT_KEYSPACE, config()).unwrap();
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
        // The evicted client has acknowledged outcomes, so it is told its session expired.
        let late = req(Some((5, 9, 4)), put_cmd("k", "late"));
        assert_eq!(
            apply(&mut a, std::slice::from_ref(&late)),
            vec![WriteResponse::SessionExpired]
        );
    }

    #[test]
    fn rejects_bad_configuration_and_order() {
        let engine = MemoryEngine::new();
        let config = StateMachineConfig {
            max_sessions: 0,
            ..Default::default()
        };
        assert!(KvStateMachine::open_with(engine.clone(), GROUP, DEFAULT_KEYSPACE, config).is_err());
        assert!(KvStateMachine::open(engine.clone(), GROUP, u32::MAX).is_err());
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
