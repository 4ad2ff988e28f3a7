//! The RocksDB [`Engine`]: one database per node, one column family per [`Cf`], shared by every
//! replica group hosted on the node.
//!
//! Sharing one instance is the point: every group's log appends go through one WAL, so one
//! fsync makes many groups' writes durable (see `group_commit`). The invariants this adapter
//! keeps:
//!
//! * every column family named by [`Cf`] exists once `open` returns, so a handle lookup cannot
//!   fail afterwards;
//! * the WAL is always on and recovery uses point-in-time mode, so after a crash the database is
//!   a prefix of the write order with every batch whole, which is the durability model of
//!   [`Engine`];
//! * `sync` is `flush_wal(true)`: with automatic WAL flushing every write has already reached
//!   the OS, so this is one fsync of the WAL that makes all earlier writes durable;
//! * reads through [`Engine::with_snapshot`] pin one RocksDB snapshot, giving a consistent view
//!   across column families (a snapshot file must never mix data from before and after an
//!   apply);
//! * RocksDB's own corruption reports map to [`StorageError::Corruption`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DBRawIteratorWithThreadMode, DBRecoveryMode, Options, ReadOptions, Snapshot,
    WriteOptions, DB,
};

use super::{memory::validate, Cf, Engine, EngineRead, KvPair, ScanIter, WriteBatch, WriteOp};
use crate::error::{Result, StorageError};

/// A node's RocksDB instance.
pub struct RocksEngine {
    db: DB,
    path: PathBuf,
}

impl RocksEngine {
    /// Opens (creating if needed) the database at `path` with all column families.
    pub fn open(path: &Path) -> Result<Arc<RocksEngine>> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Point-in-time recovery stops replay at the first damaged WAL record, so what survives
        // a crash is a prefix of the write order: the model the layers above are written to.
        opts.set_wal_recovery_mode(DBRecoveryMode::PointInTime);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        // Background flushes and compactions share the node's cores with request handling.
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        opts.increase_parallelism(i32::try_from(cores).unwrap_or(i32::MAX));

        let cfs = Cf::ALL.iter().map(|cf| {
            let mut cf_opts = Options::default();
            cf_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
            ColumnFamilyDescriptor::new(cf.name(), cf_opts)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| StorageError::engine("open", e))?;
        Ok(Arc::new(RocksEngine {
            db,
            path: path.to_path_buf(),
        }))
    }

    /// The directory the database lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, cf: Cf) -> &ColumnFamily {
        self.db
            .cf_handle(cf.name())
            .expect("every Cf is created by RocksEngine::open and never dropped")
    }

    fn read_opts(snapshot: Option<&Snapshot<'_>>) -> ReadOptions {
        let mut opts = ReadOptions::default();
        if let Some(snapshot) = snapshot {
            opts.set_snapshot(snapshot);
        }
        opts
    }

    fn get_at(&self, snapshot: Option<&Snapshot<'_>>, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db
            .get_pinned_cf_opt(self.cf(cf), key, &Self::read_opts(snapshot))
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| StorageError::engine("get", e))
    }

    /// `snapshot` borrows for `'a` because the read options hold a raw pointer to it: the
    /// snapshot must outlive the iterator.
    fn scan_at<'a>(
        &'a self,
        snapshot: Option<&'a Snapshot<'_>>,
        cf: Cf,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> ScanIter<'a> {
        let mut opts = Self::read_opts(snapshot);
        if let Some(end) = end {
            opts.set_iterate_upper_bound(end.to_vec());
        }
        let mut iter = self.db.raw_iterator_cf_opt(self.cf(cf), opts);
        iter.seek(start);
        Box::new(RocksScan {
            iter,
            started: false,
            done: false,
        })
    }

    fn last_at(&self, snapshot: Option<&Snapshot<'_>>, cf: Cf, start: &[u8], end: &[u8]) -> Result<Option<KvPair>> {
        if start >= end {
            return Ok(None);
        }
        let mut opts = Self::read_opts(snapshot);
        opts.set_iterate_lower_bound(start.to_vec());
        opts.set_iterate_upper_bound(end.to_vec());
        let mut iter = self.db.raw_iterator_cf_opt(self.cf(cf), opts);
        iter.seek_to_last();
        match iter.item() {
            Some((k, v)) => Ok(Some((k.to_vec(), v.to_vec()))),
            None => iter
                .status()
                .map(|()| None)
                .map_err(|e| StorageError::engine("last_in_range", e)),
        }
    }
}

impl EngineRead for RocksEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.get_at(None, cf, key)
    }

    fn scan<'a>(&'a self, cf: Cf, start: &[u8], end: Option<&[u8]>) -> Result<ScanIter<'a>> {
        Ok(self.scan_at(None, cf, start, end))
    }

    fn last_in_range(&self, cf: Cf, start: &[u8], end: &[u8]) -> Result<Option<KvPair>> {
        self.last_at(None, cf, start, end)
    }
}

impl Engine for RocksEngine {
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        validate(&batch)?;
        let mut rb = rocksdb::WriteBatch::default();
        for op in batch.into_ops() {
            match op {
                WriteOp::Put { cf, key, value } => rb.put_cf(self.cf(cf), key, value),
                WriteOp::Delete { cf, key } => rb.delete_cf(self.cf(cf), key),
                WriteOp::DeleteRange { cf, start, end } => rb.delete_range_cf(self.cf(cf), start, end),
            }
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        self.db
            .write_opt(rb, &opts)
            .map_err(|e| StorageError::engine("write", e))
    }

    fn sync(&self) -> Result<()> {
        self.db
            .flush_wal(true)
            .map_err(|e| StorageError::engine("sync (flush_wal)", e))
    }

    fn with_snapshot(&self, f: &mut dyn FnMut(&dyn EngineRead) -> Result<()>) -> Result<()> {
        let view = RocksSnapshotView {
            engine: self,
            snapshot: self.db.snapshot(),
        };
        f(&view)
    }
}

/// One pinned RocksDB snapshot; released when the view is dropped.
struct RocksSnapshotView<'a> {
    engine: &'a RocksEngine,
    snapshot: Snapshot<'a>,
}

impl EngineRead for RocksSnapshotView<'_> {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.engine.get_at(Some(&self.snapshot), cf, key)
    }

    fn scan<'a>(&'a self, cf: Cf, start: &[u8], end: Option<&[u8]>) -> Result<ScanIter<'a>> {
        Ok(self.engine.scan_at(Some(&self.snapshot), cf, start, end))
    }

    fn last_in_range(&self, cf: Cf, start: &[u8], end: &[u8]) -> Result<Option<KvPair>> {
        self.engine.last_at(Some(&self.snapshot), cf, start, end)
    }
}

/// Adapts RocksDB's raw iterator (which reports errors through `status` once it stops being
/// valid) to a Rust iterator of results, so that an I/O or checksum failure in the middle of
/// a scan is an error item and never a silently short scan.
struct RocksScan<'a> {
    iter: DBRawIteratorWithThreadMode<'a, DB>,
    started: bool,
    done: bool,
}

impl Iterator for RocksScan<'_> {
    type Item = Result<KvPair>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.started {
            self.iter.next();
        } else {
            self.started = true;
        }
        if let Some((k, v)) = self.iter.item() {
            return Some(Ok((k.to_vec(), v.to_vec())));
        }
        self.done = true;
        match self.iter.status() {
            Ok(()) => None,
            Err(e) => Some(Err(StorageError::engine("scan", e))),
        }
    }
}
