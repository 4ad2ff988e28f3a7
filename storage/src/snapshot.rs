//! Snapshot files: the complete state of one group's state machine at one applied index.
//!
//! Format (integers little-endian):
//!
//! ```text
//! header:  magic "BSLTSNAP" | version u32 | group u64 | keyspace u32 | crc32 of the preceding bytes
//! record:  kind u8 | key_len u32 | value_len u32 | key | value | crc32 of the preceding record bytes
//!          kind 1 = data (key: engine data key, value: the user value), ascending keys, then
//!          kind 2 = session (key: client id u64 BE, value: encoded session), ascending ids, then
//!          at most one kind 3 = applied state (empty key), which holds the shard range; every
//!          data key must lie inside it
//! trailer: kind 0xFF | record count u64 | crc32 of all record bytes | crc32 of the preceding trailer bytes
//! ```
//!
//! and nothing after the trailer.
//!
//! Invariants and why:
//!
//! * **Consistent**: [`build_snapshot`] reads data, sessions and applied state from ONE engine
//!   snapshot, so the file is the state at exactly its applied index even while applies go on.
//! * **Never half a file**: it is written to a temporary name, fsynced, renamed, and the
//!   directory fsynced; a crash leaves either the old file or the complete new one.
//! * **Verified before use**: every record carries its own checksum, the trailer carries the
//!   record count and a checksum over all records (catching dropped, duplicated or reordered
//!   records) and the file must end exactly after it (catching truncation and appended junk).
//!   Record order and key ranges are checked too. Lengths are checked against the bytes left in
//!   the file before anything is allocated, so a flipped length cannot exhaust memory.
//! * **Install is all or nothing**: [`KvStateMachine::install_snapshot`] verifies the entire
//!   file before touching the engine, then replaces the group's data, sessions and applied state
//!   in one durable atomic batch. A damaged file leaves the replica exactly as it was. The data
//!   removed is that of the replica's old range and of the snapshot's range: a replica that
//!   missed a split learns its narrower range here, and the keys it no longer owns go too.
//!
//! Corruption of a snapshot file is reported as [`StorageError::SnapshotInvalid`], not as
//! replica corruption: the replica's own state is intact and the file can be fetched again.
//! Values read from the engine while building are verified, and a failure there *is* replica
//! corruption. Installing holds the group's state in memory once, as the single atomic batch
//! requires; very large shards will want SST ingestion instead.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::engine::{Cf, Engine, WriteBatch};
use crate::error::{Result, StorageError};
use crate::keys::{applied_state_key, decode_session_key, session_key, session_range};
use crate::record::{decode_record, encode_record};
use crate::session::ClientSession;
use crate::state_machine::{AppliedState, KvStateMachine};

const MAGIC: &[u8; 8] = b"BSLTSNAP";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 8 + 4 + 8 + 4 + 4;
const TRAILER_LEN: u64 = 1 + 8 + 4 + 4;

const KIND_DATA: u8 = 1;
const KIND_SESSION: u8 = 2;
const KIND_APPLIED: u8 = 3;
const KIND_TRAILER: u8 = 0xFF;

/// What a snapshot file holds, as needed by the consensus layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Applied index of the state in the file (0 if nothing was ever applied).
    pub applied_index: u64,
    /// The consensus layer's blob stored with that apply (empty if nothing was applied).
    pub applied_meta: Vec<u8>,
    /// File size in bytes.
    pub size: u64,
    /// The shard the state serves (`None`: nothing was ever applied).
    pub shard: Option<crate::shard::ShardState>,
}

/// Writes a snapshot of `group`'s state machine (its applied shard's data, its sessions and its
/// applied state) to `path`, from one consistent engine snapshot. Replaces `path` atomically.
pub fn build_snapshot(engine: &dyn Engine, group: u64, path: &Path) -> Result<SnapshotInfo> {
    let tmp = temp_path(path);
    let result = write_snapshot(engine, group, path, &tmp);
    if result.is_err() {
        // Best effort: the error being returned matters more than a leftover temporary file,
        // which the next build overwrites anyway.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

fn write_snapshot(engine: &dyn Engine, group: u64, path: &Path, tmp: &Path) -> Result<SnapshotInfo> {
    let file = File::create(tmp).map_err(|e| StorageError::io(format!("creating {}", tmp.display()), e))?;
    let mut out = SnapshotWriter::new(BufWriter::new(file), tmp);

    let mut applied = None;
    engine.with_snapshot(&mut |view| {
        applied = AppliedState::load(view, group)?;
        out.header(group, applied.as_ref().map_or(0, |a| a.shard.keyspace))?;
        if let Some(a) = &applied {
            for item in view.scan(Cf::Data, &a.shard.start, Some(&a.shard.end))? {
                let (key, stored) = item?;
                out.record(KIND_DATA, &key, decode_record(Cf::Data, &key, &stored)?)?;
            }
        }
        let (start, end) = session_range(group);
        for item in view.scan(Cf::Meta, &start, Some(&end))? {
            let (key, stored) = item?;
            let client_id = decode_session_key(group, &key)?;
            out.record(
                KIND_SESSION,
                &client_id.to_be_bytes(),
                decode_record(Cf::Meta, &key, &stored)?,
            )?;
        }
        if let Some(applied) = &applied {
            out.record(KIND_APPLIED, &[], &applied.encode()?)?;
        }
        Ok(())
    })?;
    let size = out.trailer()?;

    let file = out
        .inner
        .into_inner()
        .map_err(|e| StorageError::io(format!("flushing {}", tmp.display()), e.into_error()))?;
    file.sync_all()
        .map_err(|e| StorageError::io(format!("fsyncing {}", tmp.display()), e))?;
    drop(file);
    std::fs::rename(tmp, path)
        .map_err(|e| StorageError::io(format!("renaming {} to {}", tmp.display(), path.display()), e))?;
    sync_parent_dir(path)?;

    let (applied_index, applied_meta, shard) =
        applied.map_or((0, Vec::new(), None), |a| (a.index, a.meta, Some(a.shard)));
    Ok(SnapshotInfo {
        applied_index,
        applied_meta,
        size,
        shard,
    })
}

/// Makes the rename durable: a renamed entry lives in the directory, not in the file.
fn sync_parent_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io(format!("fsyncing directory {}", dir.display()), e))
}

struct SnapshotWriter<'p> {
    inner: BufWriter<File>,
    path: &'p Path,
    records: u64,
    records_crc: crc32fast::Hasher,
    size: u64,
}

impl<'p> SnapshotWriter<'p> {
    fn new(inner: BufWriter<File>, path: &'p Path) -> Self {
        SnapshotWriter {
            inner,
            path,
            records: 0,
            records_crc: crc32fast::Hasher::new(),
            size: 0,
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.size += bytes.len() as u64;
        self.inner
            .write_all(bytes)
            .map_err(|e| StorageError::io(format!("writing {}", self.path.display()), e))
    }

    fn header(&mut self, group: u64, keyspace: u32) -> Result<()> {
        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&group.to_le_bytes());
        header.extend_from_slice(&keyspace.to_le_bytes());
        header.extend_from_slice(&crc32fast::hash(&header).to_le_bytes());
        self.write(&header)
    }

    fn record(&mut self, kind: u8, key: &[u8], value: &[u8]) -> Result<()> {
        let too_long = |what: &str, len: usize| {
            StorageError::InvalidArgument(format!(
                "snapshot record {what} of {len} bytes exceeds the format's u32 length"
            ))
        };
        let key_len = u32::try_from(key.len()).map_err(|_| too_long("key", key.len()))?;
        let value_len = u32::try_from(value.len()).map_err(|_| too_long("value", value.len()))?;
        let mut head = [0u8; 9];
        head[0] = kind;
        head[1..5].copy_from_slice(&key_len.to_le_bytes());
        head[5..9].copy_from_slice(&value_len.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        crc.update(key);
        crc.update(value);
        let crc = crc.finalize().to_le_bytes();
        for part in [&head[..], key, value, &crc[..]] {
            self.records_crc.update(part);
            self.write(part)?;
        }
        self.records += 1;
        Ok(())
    }

    /// Writes the trailer and returns the total file size.
    fn trailer(&mut self) -> Result<u64> {
        let mut trailer = Vec::with_capacity(TRAILER_LEN as usize);
        trailer.push(KIND_TRAILER);
        trailer.extend_from_slice(&self.records.to_le_bytes());
        trailer.extend_from_slice(&self.records_crc.clone().finalize().to_le_bytes());
        trailer.extend_from_slice(&crc32fast::hash(&trailer).to_le_bytes());
        self.write(&trailer)?;
        Ok(self.size)
    }
}

/// A verified snapshot file's contents, streamed to a visitor.
enum Item<'a> {
    Data { key: &'a [u8], value: &'a [u8] },
    Session { client_id: u64, session: ClientSession },
}

struct Header {
    group: u64,
    keyspace: u32,
}

/// What a verified file holds besides the streamed records.
struct Contents {
    header: Header,
    applied: Option<AppliedState>,
    size: u64,
}

impl Contents {
    fn info(&self) -> SnapshotInfo {
        let (applied_index, applied_meta) = self
            .applied
            .as_ref()
            .map_or((0, Vec::new()), |a| (a.index, a.meta.clone()));
        SnapshotInfo {
            applied_index,
            applied_meta,
            size: self.size,
            shard: self.applied.as_ref().map(|a| a.shard.clone()),
        }
    }
}

/// Reads and verifies the whole file at `path`, passing each data and session record to
/// `visit`. Returns the rest of the contents only if everything verified.
fn read_file(path: &Path, visit: &mut dyn FnMut(Item<'_>) -> Result<()>) -> Result<Contents> {
    let invalid = |reason: String| StorageError::SnapshotInvalid {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|e| StorageError::io(format!("opening {}", path.display()), e))?;
    let size = file
        .metadata()
        .map_err(|e| StorageError::io(format!("reading metadata of {}", path.display()), e))?
        .len();
    let mut input = Input {
        reader: BufReader::new(file),
        path,
        left: size,
    };

    let header = input.take(HEADER_LEN, "header")?;
    let (fields, crc) = header.split_at(header.len() - 4);
    if crc32fast::hash(fields).to_le_bytes() != crc {
        return Err(invalid("header checksum mismatch".into()));
    }
    if &fields[..8] != MAGIC {
        return Err(invalid("not a Basalt snapshot (bad magic)".into()));
    }
    let version = u32::from_le_bytes(le(&fields[8..12]));
    if version != VERSION {
        return Err(invalid(format!("unsupported version {version}")));
    }
    let header = Header {
        group: u64::from_le_bytes(le(&fields[12..20])),
        keyspace: u32::from_le_bytes(le(&fields[20..24])),
    };
    if header.keyspace > crate::keys::MAX_KEYSPACE {
        return Err(invalid(format!("reserved keyspace {}", header.keyspace)));
    }
    // Data keys come first and ascending; they are checked against the shard range, which the
    // applied-state record at the end carries, once it has been read.
    let mut data_bounds: Option<(Vec<u8>, Vec<u8>)> = None;

    let mut records = 0u64;
    let mut records_crc = crc32fast::Hasher::new();
    let mut last_kind = KIND_DATA;
    let mut last_key: Option<Vec<u8>> = None;
    let mut applied: Option<AppliedState> = None;
    loop {
        let kind = input.take(1, "record kind")?[0];
        if kind == KIND_TRAILER {
            break;
        }
        let lens = input.take(8, "record lengths")?;
        let key_len = u64::from(u32::from_le_bytes(le(&lens[..4])));
        let value_len = u64::from(u32::from_le_bytes(le(&lens[4..])));
        // Checked before allocating: a flipped length bit must not become a 4 GiB allocation.
        if key_len + value_len + 4 > input.left {
            return Err(invalid(format!(
                "record {records} claims {} bytes but only {} remain",
                key_len + value_len + 4,
                input.left
            )));
        }
        let body = input.take(key_len + value_len, "record body")?;
        let crc = input.take(4, "record checksum")?;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&[kind]);
        hasher.update(&lens);
        hasher.update(&body);
        if hasher.finalize().to_le_bytes()[..] != crc[..] {
            return Err(invalid(format!("record {records} checksum mismatch")));
        }
        for part in [&[kind][..], &lens, &body, &crc] {
            records_crc.update(part);
        }
        let (key, value) = body.split_at(key_len as usize);

        if kind < last_kind || applied.is_some() {
            return Err(invalid(format!("record {records} of kind {kind} is out of order")));
        }
        if kind != last_kind {
            last_key = None;
            last_kind = kind;
        }
        if last_key.as_deref().is_some_and(|last| last >= key) {
            return Err(invalid(format!("record {records} key is not ascending")));
        }
        match kind {
            KIND_DATA => {
                match &mut data_bounds {
                    Some((_, last)) => *last = key.to_vec(),
                    None => data_bounds = Some((key.to_vec(), key.to_vec())),
                }
                visit(Item::Data { key, value })?;
            }
            KIND_SESSION => {
                let client_id = <[u8; 8]>::try_from(key)
                    .map(u64::from_be_bytes)
                    .map_err(|_| invalid(format!("session key of {} bytes", key.len())))?;
                let session =
                    ClientSession::decode(client_id, value).map_err(|e| invalid(format!("session record: {e}")))?;
                visit(Item::Session { client_id, session })?;
            }
            KIND_APPLIED => {
                if !key.is_empty() {
                    return Err(invalid("applied-state record has a key".into()));
                }
                applied = Some(
                    AppliedState::decode(header.group, value)
                        .map_err(|e| invalid(format!("applied-state record: {e}")))?,
                );
            }
            other => return Err(invalid(format!("record {records} has unknown kind {other}"))),
        }
        last_key = Some(key.to_vec());
        records += 1;
    }

    let trailer = input.take(TRAILER_LEN - 1, "trailer")?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[KIND_TRAILER]);
    hasher.update(&trailer[..12]);
    if hasher.finalize().to_le_bytes()[..] != trailer[12..] {
        return Err(invalid("trailer checksum mismatch".into()));
    }
    let count = u64::from_le_bytes(le(&trailer[..8]));
    if count != records {
        return Err(invalid(format!("trailer counts {count} records, file holds {records}")));
    }
    if records_crc.finalize().to_le_bytes()[..] != trailer[8..12] {
        return Err(invalid("checksum over all records mismatch".into()));
    }
    if input.left != 0 {
        return Err(invalid(format!("{} unexpected bytes after the trailer", input.left)));
    }
    if let Some((first, last)) = &data_bounds {
        match &applied {
            Some(a) if a.shard.contains(first) && a.shard.contains(last) && a.shard.keyspace == header.keyspace => {}
            Some(_) => return Err(invalid("data keys lie outside the snapshot's shard".into())),
            None => return Err(invalid("data without an applied state".into())),
        }
    }

    Ok(Contents { header, applied, size })
}

fn le<const N: usize>(bytes: &[u8]) -> [u8; N] {
    bytes
        .try_into()
        .expect("callers slice exactly N bytes out of a buffer of checked length")
}

/// A reader that knows how many bytes the file has left, to reject impossible lengths.
struct Input<'p> {
    reader: BufReader<File>,
    path: &'p Path,
    left: u64,
}

impl Input<'_> {
    fn take(&mut self, len: u64, what: &str) -> Result<Vec<u8>> {
        if len > self.left {
            return Err(StorageError::SnapshotInvalid {
                path: self.path.to_path_buf(),
                reason: format!("truncated: {what} needs {len} bytes, {} left", self.left),
            });
        }
        let mut buf = vec![0u8; len as usize];
        self.reader
            .read_exact(&mut buf)
            .map_err(|e| StorageError::io(format!("reading {}", self.path.display()), e))?;
        self.left -= len;
        Ok(buf)
    }
}

/// Reads and verifies the whole snapshot file at `path` and returns its info.
pub fn read_snapshot_info(path: &Path) -> Result<SnapshotInfo> {
    read_file(path, &mut |_| Ok(())).map(|contents| contents.info())
}

/// A snapshot file read and verified in full, ready to replace a replica's state with
/// [`KvStateMachine::install_prepared`]. Lets the caller see the shard it carries first: a
/// snapshot of a group that absorbed a neighbour covers more than the replica serves now, and the
/// node must stop a local replica of that neighbour before installing it.
pub struct PreparedSnapshot {
    path: PathBuf,
    group: u64,
    contents: Contents,
    /// The file's data and session records, as engine writes.
    puts: WriteBatch,
}

impl PreparedSnapshot {
    /// The shard the snapshot's state serves (`None`: a snapshot of a group that applied nothing).
    pub fn shard(&self) -> Option<&crate::shard::ShardState> {
        self.contents.applied.as_ref().map(|a| &a.shard)
    }

    pub fn info(&self) -> SnapshotInfo {
        self.contents.info()
    }
}

/// Reads and verifies the whole snapshot file at `path`, to be installed on a replica of `group`.
pub fn prepare_snapshot(path: &Path, group: u64) -> Result<PreparedSnapshot> {
    let mut puts = WriteBatch::new();
    let contents = read_file(path, &mut |item| {
        match item {
            Item::Data { key, value } => {
                puts.put(Cf::Data, key.to_vec(), encode_record(key, value));
            }
            Item::Session { client_id, session } => {
                let key = session_key(group, client_id);
                let record = encode_record(&key, &session.encode()?);
                puts.put(Cf::Meta, key, record);
            }
        }
        Ok(())
    })?;
    Ok(PreparedSnapshot {
        path: path.to_path_buf(),
        group,
        contents,
        puts,
    })
}

impl KvStateMachine {
    /// Replaces this group's state with the snapshot at `path`. The whole file is verified
    /// first; then data, sessions and applied state are replaced in one durable atomic batch
    /// and the in-memory state is reloaded.
    pub fn install_snapshot(&mut self, path: &Path) -> Result<SnapshotInfo> {
        let prepared = prepare_snapshot(path, self.group())?;
        self.install_prepared(prepared)
    }

    /// Installs a snapshot read by [`prepare_snapshot`] (see [`KvStateMachine::install_snapshot`]).
    pub fn install_prepared(&mut self, prepared: PreparedSnapshot) -> Result<SnapshotInfo> {
        self.check_live()?;
        let group = self.group();
        let PreparedSnapshot {
            path,
            group: prepared_for,
            contents,
            puts,
        } = prepared;
        let header = &contents.header;
        let keyspace_differs = contents
            .applied
            .as_ref()
            .is_some_and(|a| a.shard.keyspace != self.keyspace());
        if header.group != group || prepared_for != group || keyspace_differs {
            return Err(StorageError::SnapshotInvalid {
                path,
                reason: format!(
                    "snapshot of group {} keyspace {} offered to group {group} keyspace {}",
                    header.group,
                    header.keyspace,
                    self.keyspace()
                ),
            });
        }
        // Deletions first, then the file's records: operations apply in order.
        let mut batch = WriteBatch::new();
        let old = self.shard().clone();
        batch.delete_range(Cf::Data, old.start, old.end);
        if let Some(a) = &contents.applied {
            batch.delete_range(Cf::Data, a.shard.start.clone(), a.shard.end.clone());
        }
        let (sessions_start, sessions_end) = session_range(group);
        batch.delete_range(Cf::Meta, sessions_start, sessions_end);
        batch.extend(puts);
        let key = applied_state_key(group);
        match &contents.applied {
            Some(applied) => {
                let record = encode_record(&key, &applied.encode()?);
                batch.put(Cf::Meta, key, record);
            }
            None => batch.delete(Cf::Meta, key),
        }
        self.engine().write(batch, true)?;
        self.reload()?;
        Ok(contents.info())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineRead, MemoryEngine, RocksEngine};
    use crate::keys::DEFAULT_KEYSPACE;
    use crate::session::Session;
    use crate::state_machine::{ApplyEntry, Command, WriteRequest, WriteResponse};
    use std::sync::Arc;

    const GROUP: u64 = 11;

    fn populate(sm: &mut KvStateMachine, keys: usize) {
        let requests: Vec<WriteRequest> = (0..keys)
            .map(|i| WriteRequest {
                session: (i % 3 == 0).then_some(Session {
                    client_id: 100 + i as u64,
                    sequence: 1,
                    acked_through: 0,
                }),
                command: Command::Put {
                    key: format!("key-{i:03}").into_bytes(),
                    value: vec![i as u8; i % 7],
                },
            })
            .collect();
        let entries: Vec<ApplyEntry<'_>> = requests
            .iter()
            .enumerate()
            .map(|(i, r)| ApplyEntry {
                index: i as u64 + 1,
                request: Some(r),
            })
            .collect();
        sm.apply(&entries, keys as u64, b"raft-meta".to_vec()).unwrap();
    }

    /// Data, session count, applied index and applied blob.
    type Observed = (Vec<crate::engine::KvPair>, usize, u64, Option<Vec<u8>>);

    /// Everything observable about a state machine.
    fn state(sm: &KvStateMachine) -> Observed {
        let (data, more) = sm.scan(b"", None, 0).unwrap();
        assert!(!more);
        (
            data,
            sm.session_count(),
            sm.applied_index(),
            sm.applied_meta().map(<[u8]>::to_vec),
        )
    }

    #[test]
    fn build_on_rocksdb_install_on_memory_gives_identical_state() {
        let dir = tempfile::tempdir().unwrap();
        let source = RocksEngine::open(&dir.path().join("db")).unwrap();
        let mut sm = KvStateMachine::open(
            source.clone(),
            GROUP,
            crate::ShardState::whole_keyspace(DEFAULT_KEYSPACE, false),
        )
        .unwrap();
        populate(&mut sm, 40);
        let path = dir.path().join("snap");
        let info = build_snapshot(&*source, GROUP, &path).unwrap();
        assert_eq!(info.applied_index, 40);
        assert_eq!(info.applied_meta, b"raft-meta");
        assert_eq!(info.size, std::fs::metadata(&path).unwrap().len());
        assert_eq!(read_snapshot_info(&path).unwrap(), info);
        assert!(!temp_path(&path).exists());

        let target = MemoryEngine::new();
        let mut other = KvStateMachine::open(
            target.clone(),
            GROUP,
            crate::ShardState::whole_keyspace(DEFAULT_KEYSPACE, false),
        )
        .unwrap();
        // Pre-existing state on the target must be replaced, not merged.
        populate(&mut other, 50);
        assert_eq!(other.install_snapshot(&path).unwrap(), info);
        assert_eq!(state(&other), state(&sm));
        assert_eq!(other.get(b"key-045").unwrap(), None);

        // Sessions came along: a retry on the new replica gets the cached response.
        let retry = WriteRequest {
            session: Some(Session {
                client_id: 100,
                sequence: 1,
                acked_through: 0,
            }),
            command: Command::Put {
                key: b"key-000".to_vec(),
                value: b"again".to_vec(),
            },
        };
        let entry = [ApplyEntry {
            index: 41,
            request: Some(&retry),
        }];
        assert_eq!(other.apply(&entry, 41, vec![]).unwrap(), vec![WriteResponse::Put]);
        assert_eq!(other.get(b"key-000").unwrap(), Some(vec![]), "retry was not re-applied");

        // The install was durable; the later apply was not synced and is rolled back.
        target.crash();
        let reopened = KvStateMachine::open(
            target,
            GROUP,
            crate::ShardState::whole_keyspace(DEFAULT_KEYSPACE, false),
        )
        .unwrap();
        assert_eq!(state(&reopened), state(&sm));
    }

    #[test]
    fn build_on_memory_install_on_rocksdb() {
        let source = MemoryEngine::new();
        let mut sm = KvStateMachine::open(
            source.clone(),
            GROUP,
            crate::ShardState::whole_keyspace(DEFAULT_KEYSPACE, false),
        )
        .unwrap();
        populate(&mut sm, 10);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        build_snapshot(&*source, GROUP, &path).unwrap();
        let target = RocksEngine::open(&dir.path().join("db")).unwrap();
        let mut other = KvStateMachine::open(
            target,
            GROUP,
            crate::ShardState::whole_keyspace(DEFAULT_KEYSPACE, false),
        )
        .unwrap();
        other.install_snapshot(&path).unwrap();
        assert_eq!(state(&other), state(&sm));
    }

    #[test]
    fn any_flipped_byte_is_rejected_and_the_target_is_unchanged() {
        let source = MemoryEngine::new();
        let mut sm = KvStateMachine::open(
            source.clone(),
            GROUP,
            crate::ShardState::whole_keyspace(DEFAULT_KEYSPACE, false),
        )
        .unwrap();
        populate(&mut sm, 6);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        build_snapshot(&*source, GROUP, &path).unwrap();
        let good = std::fs::read(&path).unwrap();

        let target = MemoryEngine::new();
        let mut other = KvStateMachine::open(
            target.clone(),
            GROUP,
            crate::ShardState::whole_keyspace(DEFAULT_KEYSPACE, false),
        )
        .unwrap();
        populate(&mut other, 3);
        let before = state(&other);
        let writes = target.write_count();
        let bad = dir.path().join("bad");
        for pos in 0..good.len() {
            for mask in [0x01u8, 0x80] {
                let mut bytes = good.clone();
                bytes[pos] ^= mask;
                std::fs::write(&bad, &bytes).unwrap();
                let err = other.install_snapshot(&bad).unwrap_err();
                assert!(matches!(err, StorageError::SnapshotInvalid { .. }), "byte {pos}: {err}");
                assert!(read_snapshot_info(&bad).is_err(), "byte {pos}");
            }
        }
        for (what, bytes) in [
            ("truncated", good[..good.len() - 1].to_vec()),
            ("extended", [good.as_slice(), &[0]].concat()),
            ("empty", Vec::new()),
        ] {
            std::fs::write(&bad, &bytes).unwrap();
            assert!(other.install_snapshot(&bad).is_err(), "{what}");
        }
        assert_eq!(target.write_count(), writes, "a rejected snapshot wrote to the engine");
        assert_eq!(state(&other), before);
    }

    #[test]
    fn a_snapshot_of_another_group_is_refused() {
        let source = MemoryEngine::new();
        let mut sm = KvStateMachine::open(
            source.clone(),
            GROUP,
            crate::ShardState::whole_keyspace(DEFAULT_KEYSPACE, false),
        )
        .unwrap();
        populate(&mut sm, 3);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        build_snapshot(&*source, GROUP, &path).unwrap();
        let target: Arc<MemoryEngine> = MemoryEngine::new();
        let mut other = KvStateMachine::open(
            target,
            GROUP + 1,
            crate::ShardState::whole_keyspace(DEFAULT_KEYSPACE, false),
        )
        .unwrap();
        assert!(matches!(
            other.install_snapshot(&path),
            Err(StorageError::SnapshotInvalid { .. })
        ));
        assert_eq!(other.scan(b"", None, 0).unwrap().0, vec![]);
    }

    #[test]
    fn snapshot_is_a_consistent_point_in_time() {
        // Applies that land while the snapshot is being read must not appear in it.
        let source = MemoryEngine::new();
        let mut sm = KvStateMachine::open(
            source.clone(),
            GROUP,
            crate::ShardState::whole_keyspace(DEFAULT_KEYSPACE, false),
        )
        .unwrap();
        populate(&mut sm, 5);
        let mut seen = Vec::new();
        source
            .with_snapshot(&mut |view| {
                let late = WriteRequest {
                    session: None,
                    command: Command::Put {
                        key: b"late".to_vec(),
                        value: b"x".to_vec(),
                    },
                };
                sm.apply(
                    &[ApplyEntry {
                        index: 6,
                        request: Some(&late),
                    }],
                    6,
                    vec![],
                )
                .unwrap();
                let (start, end) = crate::keys::keyspace_range(DEFAULT_KEYSPACE);
                seen = view.scan(Cf::Data, &start, Some(&end))?.collect::<Result<Vec<_>>>()?;
                Ok(())
            })
            .unwrap();
        assert_eq!(seen.len(), 5);
        assert_eq!(sm.scan(b"", None, 0).unwrap().0.len(), 6);
    }

    #[test]
    fn building_from_a_corrupt_engine_fails_as_corruption() {
        let source = MemoryEngine::new();
        let mut sm = KvStateMachine::open(
            source.clone(),
            GROUP,
            crate::ShardState::whole_keyspace(DEFAULT_KEYSPACE, false),
        )
        .unwrap();
        populate(&mut sm, 5);
        let dk = crate::keys::data_key(DEFAULT_KEYSPACE, &[], b"key-004");
        let mut stored = source.get(Cf::Data, &dk).unwrap().unwrap();
        stored[1] ^= 0xFF;
        let mut batch = WriteBatch::new();
        batch.put(Cf::Data, dk, stored);
        source.write(batch, false).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        let err = build_snapshot(&*source, GROUP, &path).unwrap_err();
        assert!(err.is_corruption(), "{err}");
        assert!(!path.exists() && !temp_path(&path).exists());
    }
}
