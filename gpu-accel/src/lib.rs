//! `basalt-gpu`: the batch checksum and compression codec of Basalt's replication streams.
//!
//! Replication traffic (AppendEntries batches, snapshot streams) crosses the network as *batches* of
//! *frames*. A batch carries an ordered list of buffers; each buffer travels as one or more frames, and
//! every frame says how it is coded (stored or LZ4 block), how long it is, and the CRC32 of its
//! uncompressed bytes. The receiver verifies everything and returns either exactly the buffers that were
//! sent or a typed [`CodecError`]: a flipped bit anywhere in a batch, a truncation at any length, or
//! trailing bytes are all errors, never data and never a panic. See [`frame`] and [`batch`] for the byte
//! layouts and the invariants the decoder checks.
//!
//! Several backends implement the same operations ([`Backend`]):
//! - [`CpuBackend`], always present: LZ4 via `lz4_flex`, CRC32 via `crc32fast`, one thread or a
//!   dedicated rayon pool over all cores for large batches;
//! - `CudaBackend` (cargo feature `cuda`): CRC32 and LZ4 compression kernels compiled with NVRTC at start-up
//!   and run through `cudarc`, which loads the CUDA driver at run time, so the feature builds without a
//!   CUDA toolkit and fails cleanly (an `Err`, no panic) on machines without a GPU.
//!
//! Every backend's output decodes on every other: the frame format is the contract, not the backend.
//! [`Dispatcher`] picks a backend per batch from its size and the presence of a device, can be forced
//! to either, and counts bytes and time per backend in [`CodecMetrics`].
//!
//! ```
//! use basalt_gpu::{Backend, CpuBackend};
//!
//! let cpu = CpuBackend::single_threaded();
//! let mut wire = Vec::new();
//! cpu.encode_batch(&[b"hello", b"", &[0u8; 1000]], &mut wire)?;
//! let decoded = cpu.decode_batch(&wire)?;
//! assert_eq!(decoded.get(0), Some(&b"hello"[..]));
//! assert_eq!(decoded.get(2), Some(&[0u8; 1000][..]));
//! # Ok::<(), basalt_gpu::CodecError>(())
//! ```

#![deny(unsafe_code)]

use std::ops::Range;

pub mod batch;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dispatch;
pub mod error;
pub mod frame;
pub mod metrics;

pub use batch::{peek_batch_len, DecodedBatch, BATCH_HEADER_LEN};
pub use cpu::CpuBackend;
#[cfg(feature = "cuda")]
pub use cuda::CudaBackend;
pub use dispatch::{BackendChoice, CpuThreads, Dispatcher, DispatcherConfig, DEFAULT_GPU_CROSSOVER_BYTES};
pub use error::CodecError;
pub use frame::{CodecId, FRAME_HEADER_LEN, MAX_FRAME_LEN};
pub use metrics::{CodecMetrics, Op, OpStats};

/// Which kind of backend did the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Cpu,
    Gpu,
}

impl BackendKind {
    /// A short lowercase name for metric labels and logs.
    pub const fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Gpu => "gpu",
        }
    }

    pub(crate) const fn index(self) -> usize {
        match self {
            BackendKind::Cpu => 0,
            BackendKind::Gpu => 1,
        }
    }
}

/// The operations every backend implements. All of them take whole batches: a backend is worth using
/// when it can work on many buffers at once.
///
/// Backends must agree: the same CRCs as `crc32fast`, and batches that every backend decodes to the
/// original buffers. The encoded bytes themselves may differ between backends (chunk sizes, compressor).
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// What kind of backend this is.
    fn kind(&self) -> BackendKind;

    /// The CRC32 (IEEE, as `crc32fast::hash`) of each buffer, in order.
    fn checksum_batch(&self, bufs: &[&[u8]]) -> Result<Vec<u32>, CodecError>;

    /// Appends one batch holding `bufs` to `out` and returns how many bytes it appended.
    /// On error `out` is left as it was.
    fn encode_batch(&self, bufs: &[&[u8]], out: &mut Vec<u8>) -> Result<usize, CodecError>;

    /// Decodes one whole batch (`batch` must be exactly one batch), appending the buffers back to back to
    /// `out`; returns the range of each buffer in `out`. On error `out` is left as it was.
    fn decode_batch_into(&self, batch: &[u8], out: &mut Vec<u8>) -> Result<Vec<Range<usize>>, CodecError>;

    /// Decodes one whole batch into a fresh [`DecodedBatch`].
    fn decode_batch(&self, batch: &[u8]) -> Result<DecodedBatch, CodecError> {
        let mut data = Vec::new();
        let ranges = self.decode_batch_into(batch, &mut data)?;
        Ok(DecodedBatch::from_parts(data, ranges))
    }
}
