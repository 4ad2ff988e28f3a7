//! Client sessions: exactly-once application of retried writes (Raft thesis, section 6.3).
//!
//! A client numbers its writes (`sequence`, from 1) under a random `client_id` and tells the
//! server, with every write, through which number it has received all outcomes
//! (`acked_through`). A retry reuses the number. For each client the state machine keeps the
//! responses of applied writes that the client has not acknowledged yet; a retry of one of them
//! gets the cached response and is **not** applied again, so a retried compare-and-swap reports
//! its original success instead of a failure caused by its own first attempt.
//!
//! Invariants, all deterministic functions of the log so that every replica holds the same
//! sessions (the table is replicated state and is included in snapshots):
//!
//! * a cached response is dropped once its sequence is `<= acked_through`; a request numbered
//!   `<= acked_through` gets `SessionExpired`, because its outcome was forgotten and applying it
//!   again could apply it twice;
//! * at most [`MAX_CACHED_RESPONSES`] responses per client: beyond that the oldest is dropped
//!   and `acked_through` is raised over it, so a late retry of it is refused, never re-applied;
//! * at most `max_sessions` sessions per group: beyond that the least recently used (by log
//!   index, ties by client id) are evicted. A request from a client this group does not know
//!   starts a fresh session, whatever `acked_through` says: a client's sequence numbers are
//!   shared by all the shards it writes to, so "unknown here but has acknowledged writes" is the
//!   normal first write to a second shard. The price: a client whose session was *evicted*
//!   (LRU, over a cap of many thousands, so idle for a very long time) and that then retries an
//!   unanswered write could have it applied twice. Closing that needs eviction tombstones kept
//!   in the replicated state (a known gap, noted for the sharding work).
//!   `max_sessions` must be the same on every replica of a group.
//!
//! When a group absorbs a neighbour in a merge, the neighbour's sessions are folded into its own
//! ([`ClientSession::absorb`]), so that a write the neighbour applied is still recognised when its
//! client retries it here.
//!
//! Changes made while applying a batch are staged in a [`SessionTxn`] and reach the in-memory
//! table only after the engine write succeeded, so a failed apply leaves memory and disk agreeing.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::engine::{Cf, EngineRead, WriteBatch};
use crate::error::{Result, StorageError};
use crate::keys::{decode_session_key, session_key, session_range};
use crate::record::{decode_record, encode_record};
use crate::state_machine::WriteResponse;

/// Responses cached per client before the oldest is forgotten.
pub const MAX_CACHED_RESPONSES: usize = 1024;

/// The session part of a write request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub client_id: u64,
    /// This write's number; a retry reuses it.
    pub sequence: u64,
    /// The client has received the outcome of every write numbered up to and including this.
    pub acked_through: u64,
}

/// What the state machine remembers about one client. Persisted in the meta CF, and carried in
/// a merge's log entry from the group merged away to the group taking its range over.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ClientSession {
    pub client_id: u64,
    pub acked_through: u64,
    /// Log index of the last request seen from this client: the LRU clock.
    pub last_used: u64,
    /// Responses of applied, unacknowledged writes by sequence.
    pub responses: BTreeMap<u64, WriteResponse>,
}

impl ClientSession {
    fn new(client_id: u64) -> Self {
        ClientSession {
            client_id,
            acked_through: 0,
            last_used: 0,
            responses: BTreeMap::new(),
        }
    }

    /// Forgets responses through `through`.
    fn ack(&mut self, through: u64) {
        if through <= self.acked_through {
            return;
        }
        self.acked_through = through;
        self.responses = match through.checked_add(1) {
            Some(first_kept) => self.responses.split_off(&first_kept),
            None => BTreeMap::new(),
        };
    }

    /// Folds in `other`, the same client's session in a group being merged into this one, so
    /// that a write either group applied and the client has not seen answered is recognised
    /// when retried here, never applied a second time:
    ///
    /// * the cached responses are the union of both: a client numbers all its writes from one
    ///   counter, so a sequence names one write, applied by at most one of the two groups (or by
    ///   their common ancestor before a split, which copied it to both: then both hold the same
    ///   response, and either may be kept);
    /// * `acked_through` is the larger of the two: the client reported every outcome up to it as
    ///   received, whichever group it said so to, so neither group's responses up to it can be
    ///   asked for again and they are dropped;
    /// * the per-client cap on cached responses holds afterwards, as after any apply.
    ///
    /// The LRU clock is the caller's to set (the merge entry's index).
    pub(crate) fn absorb(&mut self, other: ClientSession) {
        for (sequence, response) in other.responses {
            self.responses.entry(sequence).or_insert(response);
        }
        let acked = self.acked_through.max(other.acked_through);
        self.acked_through = 0;
        self.ack(acked);
        while self.responses.len() > MAX_CACHED_RESPONSES {
            match self.responses.first_key_value() {
                Some((&oldest, _)) => self.ack(oldest),
                None => break,
            }
        }
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>> {
        postcard::to_allocvec(self).map_err(|source| StorageError::Codec {
            context: format!("encoding session of client {}", self.client_id),
            source,
        })
    }

    pub(crate) fn decode(client_id: u64, payload: &[u8]) -> Result<Self> {
        let session: ClientSession = postcard::from_bytes(payload)
            .map_err(|e| StorageError::corruption(format!("session of client {client_id} does not decode: {e}")))?;
        if session.client_id != client_id {
            return Err(StorageError::corruption(format!(
                "session stored under client {client_id} names client {}",
                session.client_id
            )));
        }
        Ok(session)
    }
}

/// What to do with a request, decided by its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Admission {
    /// New write: apply it and record its response.
    Apply,
    /// Already applied: answer with the cached response.
    Cached(WriteResponse),
    /// Outcome forgotten: answer `SessionExpired`.
    Expired,
}

/// The sessions of one group.
pub(crate) struct SessionTable {
    sessions: HashMap<u64, ClientSession>,
    /// `(last_used, client_id)` of every session: eviction order.
    lru: BTreeSet<(u64, u64)>,
    max_sessions: usize,
}

impl SessionTable {
    pub fn new(max_sessions: usize) -> Self {
        SessionTable {
            sessions: HashMap::new(),
            lru: BTreeSet::new(),
            max_sessions,
        }
    }

    /// Loads every session of `group` from `view`, verifying each record.
    pub fn load(view: &dyn EngineRead, group: u64, max_sessions: usize) -> Result<Self> {
        let mut table = SessionTable::new(max_sessions);
        let (start, end) = session_range(group);
        for item in view.scan(Cf::Meta, &start, Some(&end))? {
            let (key, value) = item?;
            let client_id = decode_session_key(group, &key)?;
            let payload = decode_record(Cf::Meta, &key, &value)?;
            table.insert(ClientSession::decode(client_id, payload)?);
        }
        Ok(table)
    }

    fn insert(&mut self, session: ClientSession) {
        if let Some(old) = self.sessions.get(&session.client_id) {
            self.lru.remove(&(old.last_used, old.client_id));
        }
        self.lru.insert((session.last_used, session.client_id));
        self.sessions.insert(session.client_id, session);
    }

    fn remove(&mut self, client_id: u64) {
        if let Some(old) = self.sessions.remove(&client_id) {
            self.lru.remove(&(old.last_used, client_id));
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn get(&self, client_id: u64) -> Option<&ClientSession> {
        self.sessions.get(&client_id)
    }

    /// Starts staging the session changes of one apply batch.
    pub fn begin(&self) -> SessionTxn<'_> {
        SessionTxn {
            table: self,
            staged: BTreeMap::new(),
        }
    }

    /// Makes staged changes visible; call only after their batch was written.
    pub fn commit(&mut self, changes: SessionChanges) {
        for client_id in changes.evicted {
            self.remove(client_id);
        }
        for (_, session) in changes.staged {
            self.insert(session);
        }
    }
}

/// Session changes of one apply batch, not yet visible in the table.
pub(crate) struct SessionTxn<'a> {
    table: &'a SessionTable,
    staged: BTreeMap<u64, ClientSession>,
}

/// The outcome of [`SessionTxn::finish`], to hand to [`SessionTable::commit`].
pub(crate) struct SessionChanges {
    staged: BTreeMap<u64, ClientSession>,
    evicted: Vec<u64>,
}

impl SessionTxn<'_> {
    /// Decides what to do with a request of `session` found at log `index`.
    pub fn admit(&mut self, session: &Session, index: u64) -> Admission {
        let client_id = session.client_id;
        let state = match self.staged.entry(client_id) {
            Entry::Occupied(staged) => staged.into_mut(),
            Entry::Vacant(slot) => {
                let state = match self.table.get(client_id) {
                    Some(known) => known.clone(),
                    // New to this group (see the module docs on why `acked_through` cannot tell
                    // a first write here from a write after an eviction).
                    None => ClientSession::new(client_id),
                };
                slot.insert(state)
            }
        };
        state.last_used = index;
        state.ack(session.acked_through);
        if session.sequence <= state.acked_through {
            return Admission::Expired;
        }
        match state.responses.get(&session.sequence) {
            Some(response) => Admission::Cached(response.clone()),
            None => Admission::Apply,
        }
    }

    /// Caches the response of an applied request (which was admitted with [`Admission::Apply`]).
    pub fn record(&mut self, session: &Session, response: WriteResponse) {
        let state = self
            .staged
            .entry(session.client_id)
            .or_insert_with(|| ClientSession::new(session.client_id));
        state.responses.insert(session.sequence, response);
        if state.responses.len() > MAX_CACHED_RESPONSES {
            if let Some((&oldest, _)) = state.responses.first_key_value() {
                state.ack(oldest);
            }
        }
    }

    /// Merges `incoming` (a session of a group merged into this one, applied at log `index`)
    /// into this client's session here (see [`ClientSession::absorb`]). The merged session
    /// counts as used at `index`, so the eviction that may follow takes this group's idle
    /// sessions first.
    pub fn absorb(&mut self, incoming: ClientSession, index: u64) {
        let client_id = incoming.client_id;
        let state = match self.staged.entry(client_id) {
            Entry::Occupied(staged) => staged.into_mut(),
            Entry::Vacant(slot) => slot.insert(
                self.table
                    .get(client_id)
                    .cloned()
                    .unwrap_or_else(|| ClientSession::new(client_id)),
            ),
        };
        state.absorb(incoming);
        state.last_used = index;
    }

    /// Evicts beyond the cap and adds the session puts and deletes to `batch`.
    pub fn finish(self, group: u64, batch: &mut WriteBatch) -> Result<SessionChanges> {
        let SessionTxn { table, mut staged } = self;
        let new = staged.keys().filter(|id| table.get(**id).is_none()).count();
        let excess = (table.len() + new).saturating_sub(table.max_sessions);

        let mut evicted = Vec::new();
        if excess > 0 {
            // The `excess` least recently used of (unchanged table sessions ∪ staged ones):
            // the first `excess` unchanged ones in LRU order plus every staged one contain them.
            let mut candidates: Vec<(u64, u64)> = table
                .lru
                .iter()
                .filter(|(_, id)| !staged.contains_key(id))
                .take(excess)
                .copied()
                .collect();
            candidates.extend(staged.values().map(|s| (s.last_used, s.client_id)));
            candidates.sort_unstable();
            for &(_, client_id) in candidates.iter().take(excess) {
                staged.remove(&client_id);
                batch.delete(Cf::Meta, session_key(group, client_id));
                evicted.push(client_id);
            }
        }
        for session in staged.values() {
            let key = session_key(group, session.client_id);
            let record = encode_record(&key, &session.encode()?);
            batch.put(Cf::Meta, key, record);
        }
        Ok(SessionChanges { staged, evicted })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(client_id: u64, sequence: u64, acked_through: u64) -> Session {
        Session {
            client_id,
            sequence,
            acked_through,
        }
    }

    fn put() -> WriteResponse {
        WriteResponse::Put
    }

    /// Runs one request through admit/record/finish/commit like the state machine does.
    fn step(table: &mut SessionTable, session: Session, index: u64) -> Admission {
        let mut txn = table.begin();
        let admission = txn.admit(&session, index);
        if admission == Admission::Apply {
            txn.record(&session, put());
        }
        let changes = txn.finish(1, &mut WriteBatch::new()).unwrap();
        table.commit(changes);
        admission
    }

    #[test]
    fn retry_gets_cached_response_until_acked() {
        let mut t = SessionTable::new(10);
        assert_eq!(step(&mut t, s(5, 1, 0), 1), Admission::Apply);
        assert_eq!(step(&mut t, s(5, 1, 0), 2), Admission::Cached(put()));
        assert_eq!(step(&mut t, s(5, 2, 1), 3), Admission::Apply);
        assert!(
            t.get(5).unwrap().responses.keys().eq([2].iter()),
            "response 1 pruned once acked"
        );
        assert_eq!(step(&mut t, s(5, 1, 1), 4), Admission::Expired);
    }

    #[test]
    fn out_of_order_sequences_apply_once_each() {
        let mut t = SessionTable::new(10);
        assert_eq!(step(&mut t, s(5, 3, 0), 1), Admission::Apply);
        assert_eq!(step(&mut t, s(5, 2, 0), 2), Admission::Apply);
        assert_eq!(step(&mut t, s(5, 3, 0), 3), Admission::Cached(put()));
    }

    #[test]
    fn evicts_least_recently_used_then_lowest_client_id() {
        let mut t = SessionTable::new(2);
        step(&mut t, s(30, 1, 0), 1);
        step(&mut t, s(20, 1, 0), 2);
        step(&mut t, s(30, 2, 0), 3); // 30 is now more recent than 20
        step(&mut t, s(10, 1, 0), 4);
        assert!(t.get(20).is_none(), "least recently used evicted");
        assert!(t.get(30).is_some() && t.get(10).is_some());

        // Ties (same log index, possible within one batch) break by client id.
        let mut t = SessionTable::new(1);
        let mut txn = t.begin();
        for id in [9, 4] {
            assert_eq!(txn.admit(&s(id, 1, 0), 7), Admission::Apply);
            txn.record(&s(id, 1, 0), put());
        }
        let mut batch = WriteBatch::new();
        let changes = txn.finish(1, &mut batch).unwrap();
        t.commit(changes);
        assert!(t.get(4).is_none() && t.get(9).is_some());
        assert_eq!(t.len(), 1);
        assert!(batch
            .ops()
            .iter()
            .any(|op| matches!(op, crate::engine::WriteOp::Delete { .. })));
    }

    #[test]
    fn a_client_new_to_this_group_is_admitted_whatever_it_acknowledged_elsewhere() {
        let mut t = SessionTable::new(4);
        // Client 1's writes 1..=6 went to other shards; its first write here is number 7.
        assert_eq!(step(&mut t, s(1, 7, 6), 1), Admission::Apply);
        assert_eq!(t.get(1).map(|c| c.acked_through), Some(6));
        // Its retry is answered from the cache, and an older number is refused.
        assert!(matches!(step(&mut t, s(1, 7, 6), 2), Admission::Cached(_)));
        assert_eq!(step(&mut t, s(1, 5, 6), 3), Admission::Expired);
    }

    #[test]
    fn response_cache_is_bounded_and_forgets_safely() {
        let mut t = SessionTable::new(10);
        let total = MAX_CACHED_RESPONSES as u64 + 5;
        for seq in 1..=total {
            assert_eq!(step(&mut t, s(1, seq, 0), seq), Admission::Apply);
        }
        let state = t.get(1).unwrap();
        assert_eq!(state.responses.len(), MAX_CACHED_RESPONSES);
        assert_eq!(state.acked_through, 5);
        assert_eq!(
            step(&mut t, s(1, 3, 0), total + 1),
            Admission::Expired,
            "forgotten, never re-applied"
        );
    }

    #[test]
    fn absorbing_a_session_keeps_both_sides_unacknowledged_responses() {
        let mut here = ClientSession::new(4);
        here.acked_through = 2;
        here.responses.insert(3, put());
        here.responses.insert(6, WriteResponse::Txn { succeeded: true });
        let mut there = ClientSession::new(4);
        there.acked_through = 4;
        there.responses.insert(5, WriteResponse::Delete { existed: true });
        there.responses.insert(6, WriteResponse::Txn { succeeded: true });
        here.absorb(there);
        // 3 was acknowledged (to the other group), 5 and 6 were not.
        assert_eq!(here.acked_through, 4);
        assert_eq!(here.responses.keys().copied().collect::<Vec<_>>(), vec![5, 6]);

        // The per-client cap holds afterwards, forgetting the oldest (and refusing it later).
        let mut a = ClientSession::new(1);
        let mut b = ClientSession::new(1);
        for seq in 1..=MAX_CACHED_RESPONSES as u64 {
            a.responses.insert(2 * seq, put());
            b.responses.insert(2 * seq - 1, put());
        }
        a.absorb(b);
        assert_eq!(a.responses.len(), MAX_CACHED_RESPONSES);
        assert_eq!(a.acked_through, MAX_CACHED_RESPONSES as u64);
    }

    #[test]
    fn an_absorbed_session_is_staged_like_any_change() {
        let mut t = SessionTable::new(2);
        step(&mut t, s(1, 1, 0), 1);
        step(&mut t, s(2, 1, 0), 2);
        let mut incoming = ClientSession::new(3);
        incoming.responses.insert(9, put());
        let mut txn = t.begin();
        txn.absorb(incoming, 10);
        let changes = txn.finish(1, &mut WriteBatch::new()).unwrap();
        t.commit(changes);
        // Over the cap of 2: the least recently used (client 1) is evicted, the merged one kept.
        assert!(t.get(1).is_none());
        assert_eq!(t.get(3).map(|c| c.last_used), Some(10));
        assert_eq!(step(&mut t, s(3, 9, 0), 11), Admission::Cached(put()));
    }

    #[test]
    fn uncommitted_changes_are_invisible() {
        let mut t = SessionTable::new(10);
        step(&mut t, s(1, 1, 0), 1);
        let mut txn = t.begin();
        txn.admit(&s(1, 2, 1), 2);
        txn.record(&s(1, 2, 1), put());
        drop(txn);
        let state = t.get(1).unwrap();
        assert_eq!((state.acked_through, state.last_used), (0, 1));
    }
}
