//! openraft's state machine over `basalt_storage::KvStateMachine`, and snapshots as files.
//!
//! Invariants:
//!
//! - Applied data and the applied position move together. Each `apply` call hands the whole run of
//!   entries to `KvStateMachine::apply` as one atomic engine write that also stores the "applied
//!   meta" blob (last applied log id and membership, encoded here). After a crash the state machine
//!   is exactly at some applied position, and openraft replays the log from there.
//! - A snapshot is built from one consistent engine view (data, sessions and applied meta read from
//!   the same point), so its metadata always describes its contents, even while applies continue.
//! - Snapshot files are verified end to end before they replace any state (`install_snapshot`),
//!   and the peer service verifies a received file before it reaches openraft at all.
//! - Only the newest snapshot file is kept; older ones are removed after a newer one is durable.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use basalt_storage::{ApplyEntry, Command, Engine, KvStateMachine, SnapshotInfo, StorageError, WriteResponse};
use futures::TryStreamExt;
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use parking_lot::RwLock;

use super::types::{LogId, Snapshot, SnapshotFile, SnapshotMeta, StoredMembership, TypeConfig};
use super::wire;
use super::{ClaimHook, SplitHook};
use crate::{ConsensusMetrics, GroupHealth};

/// What the state machine stores as its opaque "applied meta": openraft's view of the position.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, Default)]
struct AppliedMeta {
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

fn decode_applied(blob: Option<&[u8]>) -> io::Result<AppliedMeta> {
    match blob {
        Some(b) => wire::decode("applied meta", b).map_err(wire::to_io),
        None => Ok(AppliedMeta::default()),
    }
}

/// Entries applied on their own rather than in a run: a split (it creates a group) and a merge
/// (it absorbs one, after the node stopped the local replica of it).
fn applied_alone(entry: &super::types::Entry) -> bool {
    matches!(&entry.payload, EntryPayload::Normal(req) if matches!(req.command, Command::Split { .. } | Command::Merge { .. }))
}

fn io_err(e: StorageError) -> io::Error {
    io::Error::other(e)
}

/// Where a group keeps its snapshot files.
#[derive(Clone, Debug)]
pub struct SnapshotDir {
    dir: PathBuf,
    seq: Arc<AtomicU64>,
}

impl SnapshotDir {
    pub fn new(dir: PathBuf) -> io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        // Leftover temporary files are from transfers or builds a crash interrupted.
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "tmp") {
                let _ = std::fs::remove_file(&p);
            }
        }
        Ok(Self {
            dir,
            seq: Arc::new(AtomicU64::new(0)),
        })
    }

    /// A fresh path for an incoming or in-progress snapshot.
    pub fn temp_path(&self, tag: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{tag}-{}-{n}.tmp", std::process::id()))
    }

    fn final_path(index: u64, dir: &Path) -> PathBuf {
        dir.join(format!("snapshot-{index:020}.snap"))
    }

    /// Makes `tmp` the current snapshot and removes older ones.
    fn promote(&self, tmp: &Path, index: u64) -> io::Result<PathBuf> {
        let dest = Self::final_path(index, &self.dir);
        std::fs::rename(tmp, &dest)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        for e in std::fs::read_dir(&self.dir)? {
            let p = e?.path();
            if p != dest && p.extension().is_some_and(|x| x == "snap") {
                let _ = std::fs::remove_file(&p);
            }
        }
        Ok(dest)
    }

    /// The newest complete snapshot file, if any.
    fn current(&self) -> io::Result<Option<PathBuf>> {
        let mut newest: Option<PathBuf> = None;
        for e in std::fs::read_dir(&self.dir)? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "snap") && newest.as_ref().is_none_or(|n| p > *n) {
                newest = Some(p);
            }
        }
        Ok(newest)
    }
}

fn snapshot_meta(info: &SnapshotInfo) -> io::Result<SnapshotMeta> {
    let applied = decode_applied(Some(&info.applied_meta))?;
    Ok(SnapshotMeta {
        last_log_id: applied.last_applied,
        last_membership: applied.membership,
    })
}

/// What the node does when this replica's range changes: a split creates a group, a merge (or a
/// snapshot of a merged shard) takes over another's range.
#[derive(Clone, Default)]
pub struct RangeHooks {
    pub on_split: Option<SplitHook>,
    pub on_claim: Option<ClaimHook>,
}

pub struct StateMachineStore {
    sm: Arc<RwLock<KvStateMachine>>,
    engine: Arc<dyn Engine>,
    group: u64,
    applied: AppliedMeta,
    snapshots: SnapshotDir,
    metrics: ConsensusMetrics,
    health: Arc<GroupHealth>,
    on_split: Option<SplitHook>,
    on_claim: Option<ClaimHook>,
}

impl StateMachineStore {
    pub fn new(
        sm: Arc<RwLock<KvStateMachine>>,
        engine: Arc<dyn Engine>,
        group: u64,
        snapshots: SnapshotDir,
        metrics: ConsensusMetrics,
        health: Arc<GroupHealth>,
        hooks: RangeHooks,
    ) -> io::Result<Self> {
        let applied = decode_applied(sm.read().applied_meta())?;
        Ok(Self {
            sm,
            engine,
            group,
            applied,
            snapshots,
            metrics,
            health,
            on_split: hooks.on_split,
            on_claim: hooks.on_claim,
        })
    }

    /// The applied meta a group born from a split starts with: it has "applied" log index 0,
    /// with the same log id on every replica (term 0, node 0, as openraft's own first entry),
    /// and the parent's membership. openraft, opening such a group, sees an applied state ahead
    /// of an empty log, purges the log up to it and builds a snapshot of it, so a replica added
    /// later can only be brought up by that snapshot, never by replaying from an empty state.
    fn born_meta(membership: &StoredMembership) -> io::Result<Vec<u8>> {
        use openraft::vote::RaftLeaderId;
        let leader = openraft::alias::LeaderIdOf::<TypeConfig>::new(0, 0);
        let first = LogId::new(leader.to_committed(), 0);
        let born = AppliedMeta {
            last_applied: Some(first),
            membership: StoredMembership::new(Some(first), membership.membership().clone()),
        };
        wire::encode("applied meta", &born).map_err(wire::to_io)
    }

    /// Applies a run of entries with no split among them as one atomic engine write.
    fn apply_run(&mut self, run: &[EntryResponder<TypeConfig>]) -> io::Result<Vec<WriteResponse>> {
        let Some((last, _)) = run.last() else {
            return Ok(Vec::new());
        };
        let mut next = self.applied.clone();
        next.last_applied = Some(last.log_id());
        for (entry, _) in run {
            if let EntryPayload::Membership(m) = &entry.payload {
                next.membership = StoredMembership::new(Some(entry.log_id()), m.clone());
            }
        }
        let blob = wire::encode("applied meta", &next).map_err(wire::to_io)?;
        let apply_entries: Vec<ApplyEntry<'_>> = run
            .iter()
            .map(|(entry, _)| ApplyEntry {
                index: entry.index(),
                request: match &entry.payload {
                    EntryPayload::Normal(req) => Some(req),
                    _ => None,
                },
            })
            .collect();
        let responses = {
            let mut sm = self.sm.write();
            sm.apply(&apply_entries, last.index(), blob)
        }
        .map_err(|e| self.stop_on_corruption(e))?;
        self.applied = next;
        Ok(responses)
    }

    /// Applies one split entry on its own. The new group is born with this group's current
    /// membership: every replica of this group applies the entry at the same point of the log,
    /// so every one of them creates the new group with the same members.
    fn apply_split(&mut self, entry: &super::types::Entry) -> io::Result<WriteResponse> {
        let EntryPayload::Normal(req) = &entry.payload else {
            unreachable!("is_split() only matches normal entries");
        };
        let mut next = self.applied.clone();
        next.last_applied = Some(entry.log_id());
        let blob = wire::encode("applied meta", &next).map_err(wire::to_io)?;
        let born = Self::born_meta(&self.applied.membership)?;
        let response = {
            let mut sm = self.sm.write();
            sm.apply_split(entry.index(), req, blob, born)
        }
        .map_err(|e| self.stop_on_corruption(e))?;
        self.applied = next;
        Ok(response)
    }

    /// Applies one merge entry on its own. If it will apply, the node first stops its local
    /// replica of the absorbed group (the claim hook), which must write nothing more into the
    /// range this group takes over; the decision and the apply see the same state, since nothing
    /// else applies to this group in between.
    async fn apply_merge(&mut self, entry: &super::types::Entry) -> io::Result<WriteResponse> {
        let EntryPayload::Normal(req) = &entry.payload else {
            unreachable!("applied_alone() only matches normal entries");
        };
        let claim = self.sm.read().check_merge(req);
        if let (Some(shard), Some(hook)) = (claim, &self.on_claim) {
            hook(self.group, shard).await.map_err(io::Error::other)?;
        }
        let mut next = self.applied.clone();
        next.last_applied = Some(entry.log_id());
        let blob = wire::encode("applied meta", &next).map_err(wire::to_io)?;
        let response = {
            let mut sm = self.sm.write();
            sm.apply_merge(entry.index(), req, blob)
        }
        .map_err(|e| self.stop_on_corruption(e))?;
        self.applied = next;
        Ok(response)
    }

    fn stop_on_corruption(&self, e: StorageError) -> io::Error {
        if e.is_corruption() {
            self.health.stop_corrupt(format!("state machine: {e}"));
        }
        io_err(e)
    }
}

pub struct SnapshotBuilder {
    engine: Arc<dyn Engine>,
    group: u64,
    snapshots: SnapshotDir,
    metrics: ConsensusMetrics,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let engine = self.engine.clone();
        let group = self.group;
        let tmp = self.snapshots.temp_path("build");
        let tmp2 = tmp.clone();
        let info = super::blocking::run(move || basalt_storage::build_snapshot(engine.as_ref(), group, &tmp2))
            .await?
            .map_err(io_err)?;
        let meta = snapshot_meta(&info)?;
        let path = self.snapshots.promote(&tmp, info.applied_index)?;
        self.metrics.snapshot_event("built");
        tracing::info!(group, index = info.applied_index, bytes = info.size, "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: SnapshotFile { path },
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures::Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        // Collect the whole run first so it becomes one atomic engine write (a split, which
        // creates a group, and a merge, which absorbs one, are written on their own: see
        // `apply_split` and `apply_merge`).
        let mut batch = Vec::new();
        while let Some(item) = entries.try_next().await? {
            batch.push(item);
        }
        let mut rest = batch.as_slice();
        let mut responses = Vec::with_capacity(batch.len());
        let mut born = Vec::new();
        while !rest.is_empty() {
            let alone_at = rest.iter().position(|(e, _)| applied_alone(e));
            let run = match alone_at {
                Some(0) => {
                    let (entry, _) = &rest[0];
                    if matches!(&entry.payload, EntryPayload::Normal(req) if matches!(req.command, Command::Merge { .. }))
                    {
                        responses.push(self.apply_merge(entry).await?);
                        rest = &rest[1..];
                        continue;
                    }
                    let response = self.apply_split(entry)?;
                    if let (WriteResponse::Split { right, .. }, EntryPayload::Normal(req)) = (&response, &entry.payload)
                    {
                        if let Command::Split { new_group, .. } = &req.command {
                            born.push((*new_group, right.clone()));
                        }
                    }
                    responses.push(response);
                    rest = &rest[1..];
                    continue;
                }
                Some(n) => &rest[..n],
                None => rest,
            };
            responses.extend(self.apply_run(run)?);
            rest = &rest[run.len()..];
        }
        for ((_, responder), resp) in batch.into_iter().zip(responses) {
            if let Some(r) = responder {
                r.send(resp);
            }
        }
        if let Some(hook) = &self.on_split {
            for (group, shard) in born {
                hook(group, shard);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            engine: self.engine.clone(),
            group: self.group,
            snapshots: self.snapshots.clone(),
            metrics: self.metrics.clone(),
        }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotFile) -> Result<(), io::Error> {
        let path = snapshot.path.clone();
        let group = self.group;
        let prepared = super::blocking::run(move || basalt_storage::prepare_snapshot(&path, group))
            .await?
            .map_err(io_err)?;
        // A snapshot of this group after it absorbed a neighbour covers more than this replica
        // serves: the node stops a local replica of that neighbour first, as before a merge.
        let claim = prepared.shard().filter(|s| !self.sm.read().shard().covers(s)).cloned();
        if let (Some(shard), Some(hook)) = (claim, &self.on_claim) {
            hook(self.group, shard).await.map_err(io::Error::other)?;
        }
        let sm = self.sm.clone();
        let info = super::blocking::run(move || sm.write().install_prepared(prepared))
            .await?
            .map_err(|e| self.stop_on_corruption(e))?;
        self.applied = decode_applied(Some(&info.applied_meta))?;
        if self.applied.last_applied != meta.last_log_id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "snapshot file holds {:?} but its metadata says {:?}",
                    self.applied.last_applied, meta.last_log_id
                ),
            ));
        }
        self.snapshots.promote(&snapshot.path, info.applied_index)?;
        self.metrics.snapshot_event("installed");
        tracing::info!(group = self.group, index = info.applied_index, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let Some(path) = self.snapshots.current()? else {
            return Ok(None);
        };
        let p = path.clone();
        let info = super::blocking::run(move || basalt_storage::read_snapshot_info(&p))
            .await?
            .map_err(io_err)?;
        Ok(Some(Snapshot {
            meta: snapshot_meta(&info)?,
            snapshot: SnapshotFile { path },
        }))
    }
}
