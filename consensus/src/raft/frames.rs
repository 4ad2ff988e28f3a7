//! Replication frames: AppendEntries payloads and snapshot chunks travel through the batch codec
//! of `basalt-gpu` (framed, checksummed, LZ4-compressed where that shrinks them).
//!
//! What is framed: every AppendEntries request that carries entries, and the data of every
//! snapshot chunk. Those are the bulk of replication traffic (catch-up of a lagging replica, a
//! new or moved replica's snapshot). Heartbeats, votes and replies stay plain postcard with a
//! crc32, as before: they are small, and a frame's header would be a large share of them.
//!
//! The receiver decodes before anything else looks at the bytes: a frame that fails any of its
//! checks (header checksum, payload checksum, decompressed length, checksum of the uncompressed
//! bytes) is rejected as `DATA_LOSS`, counted in `basalt_raft_corrupt_messages_total`, and never
//! reaches openraft or the state machine. The sender sees a network error and retries, as for any
//! lost message. A message says whether it is framed (`framed` in `peer.proto`), so a node reads
//! both forms.
//!
//! The codec is shared by every group of a node. Which backend codes a batch (the CPU always; a
//! GPU when built with `cuda`, present, and the batch is above the crossover) is the
//! dispatcher's choice, or forced by `--codec-backend`.
//!
//! [`Corruptor`] is a fault-injection hook for tests: it flips bits in outgoing frames, after they
//! are encoded, to show that the receiver's checks hold. `basaltd` never sets it.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use basalt_gpu::{BackendKind, CodecError, Dispatcher, DispatcherConfig};

use crate::metrics::PeerKind;
use crate::ConsensusMetrics;

/// Why a received batch was rejected.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("a replication batch holds exactly one buffer, this one holds {0}")]
    BufferCount(usize),
}

/// A test's hook that may damage an outgoing frame (the kind of message it is in, its bytes).
pub type Corruptor = Arc<dyn Fn(PeerKind, &mut Vec<u8>) + Send + Sync>;

/// The node's replication codec: a dispatcher, and the test-only corruptor.
#[derive(Clone)]
pub struct ReplicationCodec {
    dispatcher: Arc<Dispatcher>,
    corruptor: Option<Corruptor>,
}

impl Default for ReplicationCodec {
    /// The CPU-or-GPU dispatcher with default settings, shared by every default codec of the
    /// process (each dispatcher owns a thread pool; tests build many transports).
    fn default() -> Self {
        static SHARED: OnceLock<Arc<Dispatcher>> = OnceLock::new();
        let dispatcher = SHARED
            .get_or_init(|| {
                let cfg = DispatcherConfig {
                    choice: basalt_gpu::BackendChoice::Cpu,
                    ..DispatcherConfig::default()
                };
                Arc::new(
                    Dispatcher::new(cfg)
                        .or_else(|_| {
                            Dispatcher::new(DispatcherConfig {
                                cpu_threads: basalt_gpu::CpuThreads::Single,
                                ..cfg
                            })
                        })
                        .expect("a single-threaded CPU dispatcher needs no resources that can fail"),
                )
            })
            .clone();
        ReplicationCodec {
            dispatcher,
            corruptor: None,
        }
    }
}

impl std::fmt::Debug for ReplicationCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationCodec")
            .field("dispatcher", &self.dispatcher)
            .field("corruptor", &self.corruptor.is_some())
            .finish()
    }
}

impl ReplicationCodec {
    /// A codec over `config`'s dispatcher; fails when it forces a GPU that cannot be opened.
    pub fn new(config: DispatcherConfig) -> Result<Self, CodecError> {
        Ok(ReplicationCodec {
            dispatcher: Arc::new(Dispatcher::new(config)?),
            corruptor: None,
        })
    }

    /// Damages outgoing frames through `corruptor` (fault tests only).
    pub fn with_corruptor(mut self, corruptor: Corruptor) -> Self {
        self.corruptor = Some(corruptor);
        self
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// Frames `payload` as one batch, counting the work by backend.
    pub(crate) fn encode(
        &self,
        kind: PeerKind,
        payload: &[u8],
        metrics: &ConsensusMetrics,
    ) -> Result<Vec<u8>, CodecError> {
        let began = Instant::now();
        let mut out = Vec::with_capacity(payload.len() / 2 + 64);
        let backend = self.dispatcher.encode_batch(&[payload], &mut out)?;
        metrics.codec_work("encode", backend, payload.len(), out.len(), began.elapsed());
        if let Some(c) = &self.corruptor {
            c(kind, &mut out);
        }
        Ok(out)
    }

    /// Verifies and decodes a batch made by [`ReplicationCodec::encode`]: exactly one buffer.
    pub(crate) fn decode(&self, framed: &[u8], metrics: &ConsensusMetrics) -> Result<Vec<u8>, FrameError> {
        let began = Instant::now();
        let (data, ranges) = self.dispatcher.decode_batch(framed)?.into_parts();
        metrics.codec_work("decode", BackendKind::Cpu, data.len(), framed.len(), began.elapsed());
        match ranges.as_slice() {
            [only] if only.start == 0 && only.end == data.len() => Ok(data),
            _ => Err(FrameError::BufferCount(ranges.len())),
        }
    }
}
