//! Group commit: one thread per node turns many concurrent writers into few fsyncs.
//!
//! An fsync costs the same whether it covers one log entry or a thousand, so write throughput
//! comes from sharing it. Every replica group on the node hands its batches to one
//! [`GroupCommitWriter`]. Its dedicated OS thread loops:
//!
//! 1. block for the first queued request, then drain everything else already queued;
//! 2. merge the batches, in queue order, into **one** engine write (not synced);
//! 3. signal "visible" to every waiter: a reader now sees the writes;
//! 4. issue **one** [`Engine::sync`], which by the engine's prefix-durability model makes all of
//!    them (and every earlier write, including unsynced state-machine applies) durable;
//! 5. signal "durable" to every waiter.
//!
//! Invariants and why they hold:
//!
//! * **FIFO**: one queue, one consumer, and merging preserves order, so batches reach the engine
//!   in submission order; a later batch's put wins over an earlier one's.
//! * **Durable implies visible**: step 5 follows step 3 for the same group.
//! * **No false durability**: after a failed write or fsync the writer is poisoned and fails
//!   every later request with the same error. A failed fsync may have dropped dirty pages, so a
//!   later "successful" fsync would not prove that earlier writes are on disk (the PostgreSQL
//!   "fsyncgate" lesson); the node must restart and recover from what is really durable.
//! * The thread runs blocking engine calls, so async callers never block a runtime worker; the
//!   blocking is confined here, with exactly one thread doing I/O for the whole node.
//!
//! The same loop can instead run as a tokio task ([`GroupCommitWriter::new_on_task`]). The
//! deterministic simulator uses that: its engine is in memory, so nothing blocks, and a task is
//! scheduled by the simulated runtime, where a thread would run on real time and make the order of
//! events differ between two runs of one seed. Everything but the loop's driver is shared, so the
//! simulator exercises the same merging, signalling and poisoning as production.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::engine::{Engine, WriteBatch};
use crate::error::{Result, StorageError};
use crate::metrics::StorageMetrics;

/// One caller's batch waiting in the queue.
struct Request {
    batch: WriteBatch,
    log_entries: usize,
    visible: oneshot::Sender<Result<()>>,
    durable: DurableSender,
}

/// The first failure, kept to fail every later request the same way.
#[derive(Clone)]
struct Failure {
    stage: &'static str,
    source: Arc<StorageError>,
}

impl Failure {
    fn error(&self) -> StorageError {
        StorageError::CommitFailed {
            stage: self.stage,
            source: self.source.clone(),
        }
    }
}

/// The node's group-commit writer. See the module documentation.
pub struct GroupCommitWriter {
    queue: Mutex<Option<mpsc::UnboundedSender<Request>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    failure: Arc<Mutex<Option<Failure>>>,
    engine: Arc<dyn Engine>,
    metrics: StorageMetrics,
}

impl GroupCommitWriter {
    /// Starts the writer thread over `engine`.
    ///
    /// # Panics
    /// If the OS refuses to create a thread, which leaves the node unable to write at all.
    pub fn new(engine: Arc<dyn Engine>, metrics: StorageMetrics) -> Arc<Self> {
        let (writer, worker, rx) = Self::parts(engine, metrics);
        let thread = std::thread::Builder::new()
            .name("basalt-group-commit".into())
            .spawn(move || worker.run_blocking(rx))
            .expect("the OS must allow one more thread at node start-up");
        *writer.thread.lock() = Some(thread);
        Arc::new(writer)
    }

    /// Starts the writer as a task on the current tokio runtime instead of a thread. Only for
    /// engines whose calls never block (the in-memory one); see the module documentation.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn new_on_task(engine: Arc<dyn Engine>, metrics: StorageMetrics) -> Arc<Self> {
        let (writer, worker, rx) = Self::parts(engine, metrics);
        tokio::spawn(worker.run_async(rx));
        Arc::new(writer)
    }

    fn parts(engine: Arc<dyn Engine>, metrics: StorageMetrics) -> (Self, Worker, mpsc::UnboundedReceiver<Request>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let failure = Arc::new(Mutex::new(None));
        let worker = Worker {
            engine: engine.clone(),
            metrics: metrics.clone(),
            failure: failure.clone(),
        };
        let writer = GroupCommitWriter {
            queue: Mutex::new(Some(tx)),
            thread: Mutex::new(None),
            failure,
            engine,
            metrics,
        };
        (writer, worker, rx)
    }

    /// The engine this writer writes to.
    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// The metrics this writer reports to.
    pub fn metrics(&self) -> &StorageMetrics {
        &self.metrics
    }

    /// Queues `batch` immediately, without waiting. The queue position is fixed when this
    /// returns, which is what lets one caller pipeline several ordered writes.
    pub fn submit(&self, batch: WriteBatch, log_entries: usize) -> Result<Submitted> {
        if let Some(failure) = self.failure.lock().as_ref() {
            return Err(failure.error());
        }
        let (visible_tx, visible_rx) = oneshot::channel();
        let signal = Arc::new(Signal::default());
        let request = Request {
            batch,
            log_entries,
            visible: visible_tx,
            durable: DurableSender {
                signal: Some(signal.clone()),
            },
        };
        let queue = self.queue.lock();
        let sender = queue.as_ref().ok_or(StorageError::WriterStopped)?;
        sender.send(request).map_err(|_| StorageError::WriterStopped)?;
        Ok(Submitted {
            visible: visible_rx,
            durable: Durable { signal },
        })
    }

    /// Queues `batch`; returns once it is applied to the engine (visible to reads). The returned
    /// [`Durable`] resolves once it is fsynced. `log_entries` feeds the entries-per-fsync metric.
    ///
    /// Dropping the future after it was first polled does not withdraw the batch.
    pub async fn write(&self, batch: WriteBatch, log_entries: usize) -> Result<Durable> {
        self.submit(batch, log_entries)?.visible().await
    }

    /// Queues `batch` and returns once it is durable.
    pub async fn write_durable(&self, batch: WriteBatch, log_entries: usize) -> Result<()> {
        self.write(batch, log_entries).await?.wait().await
    }
}

impl Drop for GroupCommitWriter {
    fn drop(&mut self) {
        // Closing the queue lets the thread drain what is queued and exit, releasing its engine
        // handle, so that a RocksDB directory can be reopened once the writer is gone.
        self.queue.lock().take();
        if let Some(thread) = self.thread.lock().take() {
            // The last handle may be dropped by an on_durable callback running on the writer
            // thread itself; joining would then wait for ourselves forever.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// A queued write: await [`Submitted::visible`] for the "visible" signal.
pub struct Submitted {
    visible: oneshot::Receiver<Result<()>>,
    durable: Durable,
}

impl Submitted {
    /// Resolves once the batch is applied to the engine, with the handle for durability.
    pub async fn visible(self) -> Result<Durable> {
        match self.visible.await {
            Ok(Ok(())) => Ok(self.durable),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StorageError::WriterStopped),
        }
    }

    /// Skips the visibility signal and returns the durability handle; durable implies visible.
    pub fn into_durable(self) -> Durable {
        self.durable
    }
}

/// Resolves once a write is durable (fsynced), or with the error that prevented it.
pub struct Durable {
    signal: Arc<Signal>,
}

impl Durable {
    /// A handle that is already resolved with `result`.
    pub fn ready(result: Result<()>) -> Self {
        Durable {
            signal: Arc::new(Signal {
                state: Mutex::new(SignalState::Done(result)),
            }),
        }
    }

    /// Waits until the write is durable.
    pub async fn wait(self) -> Result<()> {
        DurableFuture { signal: self.signal }.await
    }

    /// Calls `f` once the write is durable. `f` runs on the group-commit thread (or right here
    /// if already durable), so it must be quick and must not block: every other writer of the
    /// node waits behind it. Sending on a channel is the intended use.
    pub fn on_durable(self, f: impl FnOnce(Result<()>) + Send + 'static) {
        let mut state = self.signal.state.lock();
        match std::mem::replace(&mut *state, SignalState::Consumed) {
            SignalState::Done(result) => {
                drop(state);
                f(result);
            }
            SignalState::Pending(_) => *state = SignalState::Callback(Box::new(f)),
            SignalState::Callback(_) | SignalState::Consumed => {
                unreachable!("a Durable is consumed by value, so it registers at most once")
            }
        }
    }
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &*self.signal.state.lock() {
            SignalState::Pending(_) | SignalState::Callback(_) => "pending",
            SignalState::Done(Ok(())) => "durable",
            SignalState::Done(Err(_)) => "failed",
            SignalState::Consumed => "consumed",
        };
        f.debug_struct("Durable").field("state", &state).finish()
    }
}

impl std::fmt::Debug for Submitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submitted")
            .field("durable", &self.durable)
            .finish_non_exhaustive()
    }
}

type Callback = Box<dyn FnOnce(Result<()>) + Send>;

/// A one-shot completion usable both from async code (waker) and from a callback, without
/// requiring a runtime on either side.
#[derive(Default)]
struct Signal {
    state: Mutex<SignalState>,
}

enum SignalState {
    Pending(Option<Waker>),
    Callback(Callback),
    Done(Result<()>),
    Consumed,
}

impl Default for SignalState {
    fn default() -> Self {
        SignalState::Pending(None)
    }
}

struct DurableFuture {
    signal: Arc<Signal>,
}

impl Future for DurableFuture {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let mut state = self.signal.state.lock();
        match std::mem::replace(&mut *state, SignalState::Consumed) {
            SignalState::Done(result) => Poll::Ready(result),
            SignalState::Pending(_) => {
                *state = SignalState::Pending(Some(cx.waker().clone()));
                Poll::Pending
            }
            SignalState::Callback(_) | SignalState::Consumed => {
                unreachable!("the future owns the Durable, so no callback was registered and it resolves once")
            }
        }
    }
}

/// The writer's end of a [`Signal`]. Dropping it unsent (the thread exited mid-group) resolves
/// the waiter with [`StorageError::WriterStopped`] rather than leaving it hanging forever.
struct DurableSender {
    signal: Option<Arc<Signal>>,
}

impl DurableSender {
    fn send(mut self, result: Result<()>) {
        self.complete(result);
    }

    fn complete(&mut self, result: Result<()>) {
        let Some(signal) = self.signal.take() else {
            return;
        };
        let mut state = signal.state.lock();
        match std::mem::replace(&mut *state, SignalState::Consumed) {
            SignalState::Pending(waker) => {
                *state = SignalState::Done(result);
                drop(state);
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
            SignalState::Callback(f) => {
                drop(state);
                f(result);
            }
            SignalState::Done(_) | SignalState::Consumed => {
                unreachable!("a signal has one sender and the sender completes it once")
            }
        }
    }
}

impl Drop for DurableSender {
    fn drop(&mut self) {
        self.complete(Err(StorageError::WriterStopped));
    }
}

/// State owned by the writer thread.
struct Worker {
    engine: Arc<dyn Engine>,
    metrics: StorageMetrics,
    failure: Arc<Mutex<Option<Failure>>>,
}

impl Worker {
    fn run_blocking(self, mut rx: mpsc::UnboundedReceiver<Request>) {
        while let Some(first) = rx.blocking_recv() {
            let group = Self::drain(first, &mut rx);
            self.commit(group);
        }
    }

    async fn run_async(self, mut rx: mpsc::UnboundedReceiver<Request>) {
        while let Some(first) = rx.recv().await {
            let group = Self::drain(first, &mut rx);
            self.commit(group);
        }
    }

    /// `first` and everything queued behind it right now, in queue order.
    fn drain(first: Request, rx: &mut mpsc::UnboundedReceiver<Request>) -> Vec<Request> {
        let mut group = vec![first];
        while let Ok(next) = rx.try_recv() {
            group.push(next);
        }
        group
    }

    fn fail(&self, stage: &'static str, err: StorageError) -> Failure {
        let err = self.metrics.observe_error(err);
        tracing::error!(stage, error = %err, "group commit failed; refusing further writes");
        let failure = Failure {
            stage,
            source: Arc::new(err),
        };
        *self.failure.lock() = Some(failure.clone());
        failure
    }

    fn commit(&self, group: Vec<Request>) {
        let earlier_failure = self.failure.lock().clone();
        if let Some(failure) = earlier_failure {
            for request in group {
                let _ = request.visible.send(Err(failure.error()));
                request.durable.send(Err(failure.error()));
            }
            return;
        }

        let mut merged = WriteBatch::new();
        let mut log_entries = 0;
        let mut waiters = Vec::with_capacity(group.len());
        for request in group {
            merged.extend(request.batch);
            log_entries += request.log_entries;
            waiters.push((request.visible, request.durable));
        }

        if let Err(err) = self.engine.write(merged, false) {
            let failure = self.fail("write", err);
            for (visible, durable) in waiters {
                let _ = visible.send(Err(failure.error()));
                durable.send(Err(failure.error()));
            }
            return;
        }
        let mut durables = Vec::with_capacity(waiters.len());
        for (visible, durable) in waiters {
            // A waiter that stopped listening still gets durability via its Durable.
            let _ = visible.send(Ok(()));
            durables.push(durable);
        }

        let started = Instant::now();
        let synced = self.engine.sync();
        self.metrics.fsync_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.fsyncs.inc();
        self.metrics.entries_per_fsync.observe(log_entries as f64);
        self.metrics.batches_per_fsync.observe(durables.len() as f64);
        self.metrics.write_batches.inc_by(durables.len() as u64);

        match synced {
            Ok(()) => {
                for durable in durables {
                    durable.send(Ok(()));
                }
            }
            Err(err) => {
                let failure = self.fail("fsync", err);
                for durable in durables {
                    durable.send(Err(failure.error()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Cf, EngineRead, KvPair, MemoryEngine, ScanIter};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn a_writer_on_a_task_commits_like_the_thread() {
        let engine = MemoryEngine::new();
        let writer = GroupCommitWriter::new_on_task(engine.clone(), StorageMetrics::unregistered());
        let mut batch = WriteBatch::new();
        batch.put(Cf::Data, b"k".to_vec(), b"v".to_vec());
        writer.write_durable(batch, 1).await.unwrap();
        engine.crash();
        assert_eq!(
            engine.get(Cf::Data, b"k").unwrap().as_deref(),
            Some(&b"v"[..]),
            "durable means it survives a crash"
        );
    }

    /// A memory engine whose fsync is slow (so writers pile up behind it, as on a real disk)
    /// and can be made to fail.
    struct SlowDisk {
        inner: Arc<MemoryEngine>,
        sync_delay: Duration,
        fail_sync: AtomicBool,
    }

    impl SlowDisk {
        fn new(sync_delay: Duration) -> Arc<Self> {
            Arc::new(SlowDisk {
                inner: MemoryEngine::new(),
                sync_delay,
                fail_sync: AtomicBool::new(false),
            })
        }
    }

    impl EngineRead for SlowDisk {
        fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
            self.inner.get(cf, key)
        }
        fn scan<'a>(&'a self, cf: Cf, start: &[u8], end: Option<&[u8]>) -> Result<ScanIter<'a>> {
            self.inner.scan(cf, start, end)
        }
        fn last_in_range(&self, cf: Cf, start: &[u8], end: &[u8]) -> Result<Option<KvPair>> {
            self.inner.last_in_range(cf, start, end)
        }
    }

    impl Engine for SlowDisk {
        fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
            self.inner.write(batch, sync)
        }
        fn sync(&self) -> Result<()> {
            std::thread::sleep(self.sync_delay);
            if self.fail_sync.load(Ordering::SeqCst) {
                return Err(StorageError::io(
                    "syncing the test WAL",
                    std::io::Error::other("injected EIO"),
                ));
            }
            self.inner.sync()
        }
        fn with_snapshot(&self, f: &mut dyn FnMut(&dyn EngineRead) -> Result<()>) -> Result<()> {
            self.inner.with_snapshot(f)
        }
    }

    fn put(key: &[u8], value: &[u8]) -> WriteBatch {
        let mut b = WriteBatch::new();
        b.put(Cf::RaftLog, key, value);
        b
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_share_fsyncs() {
        let disk = SlowDisk::new(Duration::from_millis(5));
        let metrics = StorageMetrics::unregistered();
        let writer = GroupCommitWriter::new(disk.clone(), metrics.clone());
        const WRITERS: u64 = 64;
        let tasks: Vec<_> = (0..WRITERS)
            .map(|i| {
                let writer = writer.clone();
                tokio::spawn(async move { writer.write_durable(put(&i.to_be_bytes(), b"v"), 1).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let fsyncs = metrics.fsyncs.get();
        assert!(
            fsyncs < WRITERS,
            "{fsyncs} fsyncs for {WRITERS} concurrent writes: no sharing"
        );
        assert_eq!(metrics.write_batches.get(), WRITERS);
        assert_eq!(disk.inner.sync_count(), fsyncs);
        assert_eq!(metrics.entries_per_fsync.get_sample_sum() as u64, WRITERS);
        // Everything acknowledged as durable survives a crash.
        disk.inner.crash();
        for i in 0..WRITERS {
            assert!(
                disk.get(Cf::RaftLog, &i.to_be_bytes()).unwrap().is_some(),
                "write {i} lost"
            );
        }
    }

    #[tokio::test]
    async fn preserves_submission_order_within_and_across_groups() {
        let disk = SlowDisk::new(Duration::from_millis(1));
        let writer = GroupCommitWriter::new(disk.clone(), StorageMetrics::unregistered());
        let submitted: Vec<Submitted> = (0u32..200)
            .map(|i| writer.submit(put(b"k", &i.to_be_bytes()), 1).unwrap())
            .collect();
        let mut durables = Vec::new();
        for s in submitted {
            durables.push(s.visible().await.unwrap());
        }
        for d in durables {
            d.wait().await.unwrap();
        }
        assert_eq!(
            disk.get(Cf::RaftLog, b"k").unwrap(),
            Some(199u32.to_be_bytes().to_vec())
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn each_writer_sees_its_own_writes_in_order() {
        let disk = SlowDisk::new(Duration::from_millis(1));
        let writer = GroupCommitWriter::new(disk.clone(), StorageMetrics::unregistered());
        let tasks: Vec<_> = (0u8..8)
            .map(|w| {
                let (writer, disk) = (writer.clone(), disk.clone());
                tokio::spawn(async move {
                    for i in 0u32..50 {
                        writer.write(put(&[w], &i.to_be_bytes()), 1).await.unwrap();
                        // Visible means visible: the read right after the write must see it.
                        assert_eq!(disk.get(Cf::RaftLog, &[w]).unwrap(), Some(i.to_be_bytes().to_vec()));
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    }

    #[tokio::test]
    async fn failed_fsync_poisons_the_writer() {
        let disk = SlowDisk::new(Duration::ZERO);
        let writer = GroupCommitWriter::new(disk.clone(), StorageMetrics::unregistered());
        writer.write_durable(put(b"a", b"1"), 1).await.unwrap();
        disk.fail_sync.store(true, Ordering::SeqCst);
        let err = writer.write_durable(put(b"b", b"2"), 1).await.unwrap_err();
        assert!(
            matches!(err, StorageError::CommitFailed { stage: "fsync", .. }),
            "{err}"
        );
        assert!(!err.is_corruption());
        // Even once the disk "recovers", nothing more is accepted.
        disk.fail_sync.store(false, Ordering::SeqCst);
        let writes_before = disk.inner.write_count();
        let err = writer.write(put(b"c", b"3"), 1).await.unwrap_err();
        assert!(
            matches!(err, StorageError::CommitFailed { stage: "fsync", .. }),
            "{err}"
        );
        assert_eq!(disk.inner.write_count(), writes_before, "a poisoned writer wrote");
    }

    #[tokio::test]
    async fn on_durable_runs_the_callback_with_the_outcome() {
        let writer = GroupCommitWriter::new(MemoryEngine::new(), StorageMetrics::unregistered());
        let (tx, rx) = tokio::sync::oneshot::channel();
        writer.write(put(b"a", b"1"), 1).await.unwrap().on_durable(move |r| {
            let _ = tx.send(r);
        });
        rx.await.unwrap().unwrap();

        let (tx, rx) = std::sync::mpsc::channel();
        Durable::ready(Err(StorageError::WriterStopped)).on_durable(move |r| {
            let _ = tx.send(r);
        });
        assert!(matches!(rx.recv().unwrap(), Err(StorageError::WriterStopped)));
    }

    #[tokio::test]
    async fn dropping_the_writer_drains_the_queue() {
        let engine = MemoryEngine::new();
        let writer = GroupCommitWriter::new(engine.clone(), StorageMetrics::unregistered());
        let pending: Vec<Durable> = (0u8..10)
            .map(|i| writer.submit(put(&[i], b"v"), 1).unwrap().into_durable())
            .collect();
        drop(writer);
        for d in pending {
            d.wait().await.unwrap();
        }
        engine.crash();
        assert_eq!(engine.scan(Cf::RaftLog, b"", None).unwrap().count(), 10);
    }
}
