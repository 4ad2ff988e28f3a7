//! An in-memory [`Engine`] with an explicit model of durability, for unit tests and the
//! deterministic simulator.
//!
//! The engine keeps two copies of every column family: `visible`, what reads see, and
//! `durable`, what would survive a crash, plus the ordered list of batches written since the
//! last sync (the un-fsynced tail of the WAL). The invariants, which mirror one RocksDB WAL:
//!
//! * `visible == durable + unsynced`, applied in write order;
//! * a synced write or [`Engine::sync`] folds the whole unsynced tail into `durable`, so a sync
//!   makes that write **and every earlier write** durable (prefix durability);
//! * [`MemoryEngine::crash`] resets `visible` to `durable`: exactly the durable prefix survives.
//!   [`MemoryEngine::crash_keeping_unsynced`] models the kinder case where the OS had already
//!   written part of the tail, which is still a prefix of the write order and never a torn
//!   batch.
//!
//! Column families are `Arc`-shared, copy-on-write maps so that a snapshot or a scan costs one
//! reference-count increment and stays consistent while writers continue: a writer clones a
//! map only when a reader still holds the old version. The lock is never held while user code
//! runs, so `with_snapshot` callbacks and open iterators cannot block writers.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Cf, Engine, EngineRead, KvPair, ScanIter, WriteBatch, WriteOp};
use crate::error::{Result, StorageError};

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

/// One version of every column family, indexed by [`Cf::index`].
#[derive(Clone, Default)]
struct Tables([Arc<Map>; 4]);

impl Tables {
    fn map(&self, cf: Cf) -> &Arc<Map> {
        &self.0[cf.index()]
    }

    fn apply(&mut self, batch: &WriteBatch) {
        for op in batch.ops() {
            match op {
                WriteOp::Put { cf, key, value } => {
                    Arc::make_mut(&mut self.0[cf.index()]).insert(key.clone(), value.clone());
                }
                WriteOp::Delete { cf, key } => {
                    if self.0[cf.index()].contains_key(key) {
                        Arc::make_mut(&mut self.0[cf.index()]).remove(key);
                    }
                }
                WriteOp::DeleteRange { cf, start, end } => {
                    if start >= end {
                        continue;
                    }
                    let doomed: Vec<Vec<u8>> = self.0[cf.index()]
                        .range::<[u8], _>((Bound::Included(&start[..]), Bound::Excluded(&end[..])))
                        .map(|(k, _)| k.clone())
                        .collect();
                    if !doomed.is_empty() {
                        let map = Arc::make_mut(&mut self.0[cf.index()]);
                        for key in doomed {
                            map.remove(&key);
                        }
                    }
                }
            }
        }
    }
}

struct State {
    visible: Tables,
    durable: Tables,
    /// Batches applied to `visible` but not yet to `durable`, oldest first.
    unsynced: Vec<WriteBatch>,
}

impl State {
    fn sync(&mut self) {
        for batch in self.unsynced.drain(..) {
            self.durable.apply(&batch);
        }
    }
}

/// The in-memory engine. See the module documentation for its durability model.
pub struct MemoryEngine {
    state: Mutex<State>,
    writes: AtomicU64,
    syncs: AtomicU64,
}

impl MemoryEngine {
    pub fn new() -> Arc<Self> {
        Arc::new(MemoryEngine {
            state: Mutex::new(State {
                visible: Tables::default(),
                durable: Tables::default(),
                unsynced: Vec::new(),
            }),
            writes: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
        })
    }

    /// Simulates a crash and restart: drops every write that was not made durable.
    pub fn crash(&self) {
        self.crash_keeping_unsynced(0);
    }

    /// Simulates a crash in which the first `keep` un-fsynced batches happened to reach the
    /// disk (the OS wrote them back before power was lost). What survives is still a prefix of
    /// the write order; `keep` beyond the tail keeps everything.
    pub fn crash_keeping_unsynced(&self, keep: usize) {
        let mut state = self.state.lock();
        let keep = keep.min(state.unsynced.len());
        let survivors: Vec<WriteBatch> = state.unsynced.drain(..keep).collect();
        for batch in &survivors {
            state.durable.apply(batch);
        }
        state.unsynced.clear();
        state.visible = state.durable.clone();
    }

    /// Number of batches written but not yet durable.
    pub fn unsynced_len(&self) -> usize {
        self.state.lock().unsynced.len()
    }

    /// Number of successful `write` calls so far.
    pub fn write_count(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Number of fsyncs so far: `sync` calls plus writes made with `sync = true`.
    pub fn sync_count(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    fn current(&self) -> Tables {
        self.state.lock().visible.clone()
    }
}

impl EngineRead for MemoryEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.state.lock().visible.map(cf).get(key).cloned())
    }

    fn scan<'a>(&'a self, cf: Cf, start: &[u8], end: Option<&[u8]>) -> Result<ScanIter<'a>> {
        let map = self.current().map(cf).clone();
        Ok(Box::new(MemoryScan::new(map, start, end)))
    }

    fn last_in_range(&self, cf: Cf, start: &[u8], end: &[u8]) -> Result<Option<KvPair>> {
        let map = self.current().map(cf).clone();
        Ok(last_in(&map, start, end))
    }
}

impl Engine for MemoryEngine {
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        validate(&batch)?;
        let mut state = self.state.lock();
        state.visible.apply(&batch);
        state.unsynced.push(batch);
        if sync {
            state.sync();
            self.syncs.fetch_add(1, Ordering::Relaxed);
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.state.lock().sync();
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn with_snapshot(&self, f: &mut dyn FnMut(&dyn EngineRead) -> Result<()>) -> Result<()> {
        let snapshot = MemorySnapshot { tables: self.current() };
        f(&snapshot)
    }
}

/// Rejects what RocksDB rejects, so that both engines accept exactly the same batches.
pub(super) fn validate(batch: &WriteBatch) -> Result<()> {
    for op in batch.ops() {
        if let WriteOp::DeleteRange { cf, start, end } = op {
            if start > end {
                return Err(StorageError::InvalidArgument(format!(
                    "delete_range on {cf} with start {start:?} after end {end:?}"
                )));
            }
        }
    }
    Ok(())
}

/// A frozen view of every column family.
struct MemorySnapshot {
    tables: Tables,
}

impl EngineRead for MemorySnapshot {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tables.map(cf).get(key).cloned())
    }

    fn scan<'a>(&'a self, cf: Cf, start: &[u8], end: Option<&[u8]>) -> Result<ScanIter<'a>> {
        Ok(Box::new(MemoryScan::new(self.tables.map(cf).clone(), start, end)))
    }

    fn last_in_range(&self, cf: Cf, start: &[u8], end: &[u8]) -> Result<Option<KvPair>> {
        Ok(last_in(self.tables.map(cf), start, end))
    }
}

fn last_in(map: &Map, start: &[u8], end: &[u8]) -> Option<KvPair> {
    // BTreeMap::range panics on an inverted range; RocksDB simply finds nothing.
    if start >= end {
        return None;
    }
    map.range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
        .next_back()
        .map(|(k, v)| (k.clone(), v.clone()))
}

/// A lazy ascending scan over one frozen map version. It re-seeks after the last returned key
/// on every step (O(log n)) instead of borrowing the map, which would make the iterator
/// self-referential; holding the `Arc` keeps the version alive and unchanged.
struct MemoryScan {
    map: Arc<Map>,
    from: Bound<Vec<u8>>,
    end: Option<Vec<u8>>,
}

impl MemoryScan {
    fn new(map: Arc<Map>, start: &[u8], end: Option<&[u8]>) -> Self {
        MemoryScan {
            map,
            from: Bound::Included(start.to_vec()),
            end: end.map(<[u8]>::to_vec),
        }
    }
}

impl Iterator for MemoryScan {
    type Item = Result<KvPair>;

    fn next(&mut self) -> Option<Self::Item> {
        let from = match &self.from {
            Bound::Included(k) | Bound::Excluded(k) => k.as_slice(),
            Bound::Unbounded => return None,
        };
        let upper = match &self.end {
            // BTreeMap::range panics on an inverted (or empty excluded) range.
            Some(end) if from >= end.as_slice() => return None,
            Some(end) => Bound::Excluded(end.as_slice()),
            None => Bound::Unbounded,
        };
        let lower = match &self.from {
            Bound::Included(_) => Bound::Included(from),
            _ => Bound::Excluded(from),
        };
        let found = self
            .map
            .range::<[u8], _>((lower, upper))
            .next()
            .map(|(k, v)| (k.clone(), v.clone()));
        match found {
            Some((k, v)) => {
                self.from = Bound::Excluded(k.clone());
                Some(Ok((k, v)))
            }
            None => {
                // Exhausted: remember it so that later calls do no work.
                self.from = Bound::Unbounded;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn put(cf: Cf, k: &[u8], v: &[u8]) -> WriteBatch {
        let mut b = WriteBatch::new();
        b.put(cf, k, v);
        b
    }

    fn get(e: &MemoryEngine, k: &[u8]) -> Option<Vec<u8>> {
        e.get(Cf::Data, k).expect("memory engine reads cannot fail")
    }

    #[test]
    fn crash_drops_unsynced_writes() {
        let e = MemoryEngine::new();
        e.write(put(Cf::Data, b"a", b"1"), false).unwrap();
        assert_eq!(get(&e, b"a"), Some(b"1".to_vec()), "visible before sync");
        e.crash();
        assert_eq!(get(&e, b"a"), None);
        assert_eq!(e.unsynced_len(), 0);
    }

    #[test]
    fn synced_write_makes_every_earlier_write_durable() {
        let e = MemoryEngine::new();
        e.write(put(Cf::Data, b"a", b"1"), false).unwrap();
        e.write(put(Cf::Meta, b"m", b"2"), false).unwrap();
        e.write(put(Cf::RaftLog, b"l", b"3"), true).unwrap();
        e.write(put(Cf::Data, b"late", b"4"), false).unwrap();
        e.crash();
        assert_eq!(get(&e, b"a"), Some(b"1".to_vec()));
        assert_eq!(e.get(Cf::Meta, b"m").unwrap(), Some(b"2".to_vec()));
        assert_eq!(e.get(Cf::RaftLog, b"l").unwrap(), Some(b"3".to_vec()));
        assert_eq!(get(&e, b"late"), None, "written after the last sync");
    }

    #[test]
    fn sync_makes_all_writes_durable_including_deletions() {
        let e = MemoryEngine::new();
        e.write(put(Cf::Data, b"a", b"1"), true).unwrap();
        let mut b = WriteBatch::new();
        b.delete(Cf::Data, b"a");
        b.put(Cf::Data, b"b", b"2");
        e.write(b, false).unwrap();
        e.sync().unwrap();
        e.crash();
        assert_eq!(get(&e, b"a"), None);
        assert_eq!(get(&e, b"b"), Some(b"2".to_vec()));
        assert_eq!(e.sync_count(), 2);
        assert_eq!(e.write_count(), 2);
    }

    #[test]
    fn crash_keeping_part_of_the_tail_keeps_a_prefix() {
        let e = MemoryEngine::new();
        for (i, k) in [b"a", b"b", b"c"].iter().enumerate() {
            e.write(put(Cf::Data, *k, &[i as u8]), false).unwrap();
        }
        e.crash_keeping_unsynced(2);
        assert_eq!(get(&e, b"a"), Some(vec![0]));
        assert_eq!(get(&e, b"b"), Some(vec![1]));
        assert_eq!(get(&e, b"c"), None);
        // What survived is now durable: a second crash keeps it.
        e.crash();
        assert_eq!(get(&e, b"b"), Some(vec![1]));
    }

    #[test]
    fn snapshot_is_unaffected_by_a_later_crash() {
        let e = MemoryEngine::new();
        e.write(put(Cf::Data, b"a", b"1"), false).unwrap();
        let mut seen = None;
        e.with_snapshot(&mut |view| {
            e.crash();
            seen = view.get(Cf::Data, b"a")?;
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, Some(b"1".to_vec()));
        assert_eq!(get(&e, b"a"), None);
    }

    proptest! {
        /// Against a model: after any sequence of writes (some synced) and a crash, the engine
        /// holds exactly the state produced by the writes up to the last synced one.
        #[test]
        fn crash_keeps_exactly_the_durable_prefix(
            ops in proptest::collection::vec((0u8..8, any::<u8>(), any::<bool>(), any::<bool>()), 1..40)
        ) {
            let e = MemoryEngine::new();
            let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            let mut durable_model = model.clone();
            for (key, value, delete, sync) in ops {
                let mut b = WriteBatch::new();
                if delete {
                    b.delete(Cf::Data, vec![key]);
                    model.remove(&vec![key]);
                } else {
                    b.put(Cf::Data, vec![key], vec![value]);
                    model.insert(vec![key], vec![value]);
                }
                e.write(b, sync).unwrap();
                if sync {
                    durable_model = model.clone();
                }
            }
            let visible: BTreeMap<_, _> = e.scan(Cf::Data, b"", None).unwrap().map(|r| r.unwrap()).collect();
            prop_assert_eq!(&visible, &model);
            e.crash();
            let after: BTreeMap<_, _> = e.scan(Cf::Data, b"", None).unwrap().map(|r| r.unwrap()).collect();
            prop_assert_eq!(after, durable_model);
        }
    }
}
