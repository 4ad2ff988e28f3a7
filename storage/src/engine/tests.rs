//! One test suite run over both engines: the layers above are written once against the trait,
//! so the engines must be indistinguishable through it (apart from durability, which
//! `memory.rs` tests against its model and `reopen_keeps_synced_writes` checks for RocksDB).

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;

use super::{Cf, Engine, EngineRead, MemoryEngine, RocksEngine, WriteBatch};
use crate::error::{Result, StorageError};

/// A fresh engine; the guard keeps a RocksDB directory alive for the test's duration.
type Fresh = (Arc<dyn Engine>, Option<tempfile::TempDir>);

fn memory() -> Fresh {
    (MemoryEngine::new(), None)
}

fn rocks() -> Fresh {
    let dir = tempfile::tempdir().expect("the test needs a temporary directory");
    let engine = RocksEngine::open(dir.path()).expect("a fresh RocksDB directory opens");
    (engine, Some(dir))
}

fn collect(e: &dyn EngineRead, cf: Cf, start: &[u8], end: Option<&[u8]>) -> Vec<(Vec<u8>, Vec<u8>)> {
    e.scan(cf, start, end).unwrap().collect::<Result<Vec<_>>>().unwrap()
}

fn batch(ops: &[(&[u8], Option<&[u8]>)]) -> WriteBatch {
    let mut b = WriteBatch::new();
    for (k, v) in ops {
        match v {
            Some(v) => b.put(Cf::Data, *k, *v),
            None => b.delete(Cf::Data, *k),
        }
    }
    b
}

/// Declares each test once per engine.
macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        mod on_memory {
            $(#[test] fn $name() { super::$name(super::memory) })*
        }
        mod on_rocksdb {
            $(#[test] fn $name() { super::$name(super::rocks) })*
        }
    };
}

both_engines!(
    put_get_delete,
    column_families_are_isolated,
    scan_is_ordered_and_bounded,
    delete_range_and_batch_order,
    last_in_range_finds_the_last_pair,
    snapshot_is_point_in_time,
    open_scan_is_unaffected_by_later_writes,
    inverted_delete_range_is_rejected_atomically,
);

fn put_get_delete(fresh: fn() -> Fresh) {
    let (e, _dir) = fresh();
    assert_eq!(e.get(Cf::Data, b"k").unwrap(), None);
    e.write(batch(&[(b"k", Some(b"v1"))]), false).unwrap();
    assert_eq!(e.get(Cf::Data, b"k").unwrap(), Some(b"v1".to_vec()));
    e.write(batch(&[(b"k", Some(b"v2"))]), true).unwrap();
    assert_eq!(e.get(Cf::Data, b"k").unwrap(), Some(b"v2".to_vec()));
    e.write(batch(&[(b"k", None), (b"absent", None)]), false).unwrap();
    assert_eq!(e.get(Cf::Data, b"k").unwrap(), None);
    e.write(WriteBatch::new(), false).unwrap();
    e.sync().unwrap();
}

fn column_families_are_isolated(fresh: fn() -> Fresh) {
    let (e, _dir) = fresh();
    let mut b = WriteBatch::new();
    for (i, cf) in Cf::ALL.iter().enumerate() {
        b.put(*cf, b"same-key", vec![i as u8]);
    }
    e.write(b, false).unwrap();
    for (i, cf) in Cf::ALL.iter().enumerate() {
        assert_eq!(e.get(*cf, b"same-key").unwrap(), Some(vec![i as u8]));
    }
    let mut b = WriteBatch::new();
    b.delete_range(Cf::Meta, b"".to_vec(), vec![0xFF; 10]);
    e.write(b, false).unwrap();
    assert_eq!(e.get(Cf::Meta, b"same-key").unwrap(), None);
    assert_eq!(e.get(Cf::Data, b"same-key").unwrap(), Some(vec![2]));
}

fn scan_is_ordered_and_bounded(fresh: fn() -> Fresh) {
    let (e, _dir) = fresh();
    let keys: [&[u8]; 6] = [b"", b"\x00", b"a", b"a\x00", b"b", b"\xff\xff"];
    let mut b = WriteBatch::new();
    for k in keys.iter().rev() {
        b.put(Cf::Data, *k, *k);
    }
    e.write(b, false).unwrap();
    let all = collect(&*e, Cf::Data, b"", None);
    assert_eq!(all.iter().map(|(k, _)| k.as_slice()).collect::<Vec<_>>(), keys.to_vec());
    let mid = collect(&*e, Cf::Data, b"a", Some(b"b"));
    assert_eq!(
        mid.iter().map(|(k, _)| k.as_slice()).collect::<Vec<_>>(),
        vec![&b"a"[..], b"a\x00"]
    );
    assert!(collect(&*e, Cf::Data, b"b", Some(b"b")).is_empty());
    assert!(collect(&*e, Cf::Data, b"c", Some(b"a")).is_empty());
    assert!(collect(&*e, Cf::RaftLog, b"", None).is_empty());
}

fn delete_range_and_batch_order(fresh: fn() -> Fresh) {
    let (e, _dir) = fresh();
    let mut b = WriteBatch::new();
    for k in [b"a", b"b", b"c", b"d"] {
        b.put(Cf::Data, *k, b"old");
    }
    e.write(b, false).unwrap();
    let mut b = WriteBatch::new();
    b.delete_range(Cf::Data, b"b".to_vec(), b"d".to_vec());
    // Applied after the range deletion, so it survives it.
    b.put(Cf::Data, b"c", b"new");
    b.delete_range(Cf::Data, b"x".to_vec(), b"x".to_vec());
    e.write(b, false).unwrap();
    let got = collect(&*e, Cf::Data, b"", None);
    assert_eq!(
        got,
        vec![
            (b"a".to_vec(), b"old".to_vec()),
            (b"c".to_vec(), b"new".to_vec()),
            (b"d".to_vec(), b"old".to_vec()),
        ]
    );
}

fn last_in_range_finds_the_last_pair(fresh: fn() -> Fresh) {
    let (e, _dir) = fresh();
    assert_eq!(e.last_in_range(Cf::RaftLog, b"a", b"z").unwrap(), None);
    let mut b = WriteBatch::new();
    for k in [b"a1", b"a2", b"b1"] {
        b.put(Cf::RaftLog, *k, *k);
    }
    e.write(b, false).unwrap();
    assert_eq!(
        e.last_in_range(Cf::RaftLog, b"a", b"b").unwrap(),
        Some((b"a2".to_vec(), b"a2".to_vec()))
    );
    assert_eq!(e.last_in_range(Cf::RaftLog, b"a", b"a2").unwrap().unwrap().0, b"a1");
    assert_eq!(e.last_in_range(Cf::RaftLog, b"a2", b"a2").unwrap(), None);
    assert_eq!(e.last_in_range(Cf::RaftLog, b"z", b"a").unwrap(), None);
    assert_eq!(e.last_in_range(Cf::RaftLog, b"c", b"d").unwrap(), None);
}

fn snapshot_is_point_in_time(fresh: fn() -> Fresh) {
    let (e, _dir) = fresh();
    let mut b = WriteBatch::new();
    b.put(Cf::Data, b"k", b"before");
    b.put(Cf::Meta, b"applied", b"1");
    e.write(b, false).unwrap();
    let mut seen = Vec::new();
    e.with_snapshot(&mut |view| {
        // A concurrent apply changes both column families after the snapshot was taken.
        let mut b = WriteBatch::new();
        b.put(Cf::Data, b"k", b"after");
        b.put(Cf::Data, b"k2", b"after");
        b.put(Cf::Meta, b"applied", b"2");
        e.write(b, false)?;
        seen.push(view.get(Cf::Data, b"k")?);
        seen.push(view.get(Cf::Meta, b"applied")?);
        seen.push(view.last_in_range(Cf::Data, b"", b"\xff")?.map(|(k, _)| k));
        seen.push(Some(collect(view, Cf::Data, b"", None).len().to_string().into_bytes()));
        Ok(())
    })
    .unwrap();
    assert_eq!(
        seen,
        vec![
            Some(b"before".to_vec()),
            Some(b"1".to_vec()),
            Some(b"k".to_vec()),
            Some(b"1".to_vec())
        ]
    );
    assert_eq!(e.get(Cf::Data, b"k").unwrap(), Some(b"after".to_vec()));
    // Errors from the closure come back unchanged.
    let err = e
        .with_snapshot(&mut |_| Err(StorageError::InvalidArgument("from closure".into())))
        .unwrap_err();
    assert!(matches!(err, StorageError::InvalidArgument(m) if m == "from closure"));
}

fn open_scan_is_unaffected_by_later_writes(fresh: fn() -> Fresh) {
    let (e, _dir) = fresh();
    e.write(batch(&[(b"a", Some(b"1")), (b"b", Some(b"1"))]), false)
        .unwrap();
    let mut scan = e.scan(Cf::Data, b"", None).unwrap();
    assert_eq!(scan.next().unwrap().unwrap().0, b"a");
    e.write(batch(&[(b"b", None), (b"c", Some(b"1"))]), false).unwrap();
    let rest: Vec<Vec<u8>> = scan.map(|r| r.unwrap().0).collect();
    assert_eq!(rest, vec![b"b".to_vec()]);
}

fn inverted_delete_range_is_rejected_atomically(fresh: fn() -> Fresh) {
    let (e, _dir) = fresh();
    let mut b = WriteBatch::new();
    b.put(Cf::Data, b"k", b"v");
    b.delete_range(Cf::Data, b"z".to_vec(), b"a".to_vec());
    assert!(matches!(e.write(b, false), Err(StorageError::InvalidArgument(_))));
    assert_eq!(e.get(Cf::Data, b"k").unwrap(), None);
}

#[test]
fn rocksdb_reopen_keeps_synced_writes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let e = RocksEngine::open(dir.path()).unwrap();
        e.write(batch(&[(b"a", Some(b"1"))]), true).unwrap();
        e.write(batch(&[(b"b", Some(b"2"))]), false).unwrap();
        e.sync().unwrap();
    }
    let e = RocksEngine::open(dir.path()).unwrap();
    assert_eq!(e.get(Cf::Data, b"a").unwrap(), Some(b"1".to_vec()));
    assert_eq!(e.get(Cf::Data, b"b").unwrap(), Some(b"2".to_vec()));
    assert_eq!(e.path(), dir.path());
}

#[derive(Debug, Clone)]
enum Op {
    Put(Cf, Vec<u8>, Vec<u8>),
    Delete(Cf, Vec<u8>),
    DeleteRange(Cf, Vec<u8>, Vec<u8>),
}

fn small_key() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), Just(b'a'), Just(0xFFu8)], 0..3)
}

fn cf() -> impl Strategy<Value = Cf> {
    prop_oneof![Just(Cf::Data), Just(Cf::Meta)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (cf(), small_key(), proptest::collection::vec(any::<u8>(), 0..4)).prop_map(|(c, k, v)| Op::Put(c, k, v)),
        2 => (cf(), small_key()).prop_map(|(c, k)| Op::Delete(c, k)),
        1 => (cf(), small_key(), small_key()).prop_map(|(c, a, b)| {
            let (a, b) = if a <= b { (a, b) } else { (b, a) };
            Op::DeleteRange(c, a, b)
        }),
    ]
}

fn dump(e: &dyn EngineRead) -> BTreeMap<(Cf, Vec<u8>), Vec<u8>> {
    Cf::ALL
        .iter()
        .flat_map(|cf| collect(e, *cf, b"", None).into_iter().map(move |(k, v)| ((*cf, k), v)))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Both engines, fed the same batches, hold the same contents and answer every range
    /// query the same way.
    #[test]
    fn engines_agree(batches in proptest::collection::vec(proptest::collection::vec(op(), 1..5), 1..12),
                     start in small_key(), end in small_key()) {
        let (mem, _) = memory();
        let (rocks, _dir) = rocks();
        for ops in batches {
            let mut b = WriteBatch::new();
            for op in ops {
                match op {
                    Op::Put(cf, k, v) => b.put(cf, k, v),
                    Op::Delete(cf, k) => b.delete(cf, k),
                    Op::DeleteRange(cf, s, e) => b.delete_range(cf, s, e),
                }
            }
            mem.write(b.clone(), false).unwrap();
            rocks.write(b, false).unwrap();
        }
        prop_assert_eq!(dump(&*mem), dump(&*rocks));
        for cf in [Cf::Data, Cf::Meta] {
            prop_assert_eq!(collect(&*mem, cf, &start, Some(&end)), collect(&*rocks, cf, &start, Some(&end)));
            prop_assert_eq!(collect(&*mem, cf, &start, None), collect(&*rocks, cf, &start, None));
            prop_assert_eq!(mem.last_in_range(cf, &start, &end).unwrap(), rocks.last_in_range(cf, &start, &end).unwrap());
        }
    }
}
