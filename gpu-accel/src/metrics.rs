//! Counters of the codec's work, per backend and operation, for callers to export.
//!
//! This crate depends on no metrics library: the server reads [`CodecMetrics::get`] and publishes the
//! numbers under its own names (with the backend label from [`BackendKind::name`]). Every counter only
//! grows, and each is updated on its own with relaxed ordering: a reader may see the bytes of a call
//! before its nanoseconds, which no rate computed from these counters can notice.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::BackendKind;

/// An operation of the codec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Checksum,
    Encode,
    Decode,
}

impl Op {
    /// All operations, for exporters that iterate.
    pub const ALL: [Op; 3] = [Op::Checksum, Op::Encode, Op::Decode];

    /// A short lowercase name for metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Op::Checksum => "checksum",
            Op::Encode => "encode",
            Op::Decode => "decode",
        }
    }

    const fn index(self) -> usize {
        match self {
            Op::Checksum => 0,
            Op::Encode => 1,
            Op::Decode => 2,
        }
    }
}

/// Totals for one backend and operation. `bytes_in` is what the caller handed over (buffers to checksum
/// or encode, an encoded batch to decode); `bytes_out` is what came back (the encoded batch, the decoded
/// buffers; 4 bytes per checksum).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpStats {
    pub calls: u64,
    pub errors: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub nanos: u64,
}

#[derive(Debug, Default)]
struct Cell {
    calls: AtomicU64,
    errors: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    nanos: AtomicU64,
}

/// The codec's counters. Share it with `Arc`; all methods take `&self`.
#[derive(Debug, Default)]
pub struct CodecMetrics {
    cells: [[Cell; 3]; 2],
    gpu_fallbacks: AtomicU64,
}

impl CodecMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one call. `bytes_out` is ignored for a failed call (`ok == false`).
    pub fn record(&self, backend: BackendKind, op: Op, ok: bool, bytes_in: u64, bytes_out: u64, elapsed: Duration) {
        let cell = &self.cells[backend.index()][op.index()];
        cell.calls.fetch_add(1, Ordering::Relaxed);
        cell.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
        cell.nanos
            .fetch_add(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        if ok {
            cell.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
        } else {
            cell.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a GPU failure that the dispatcher answered by redoing the work on the CPU.
    pub fn record_gpu_fallback(&self) {
        self.gpu_fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// The totals so far for one backend and operation.
    pub fn get(&self, backend: BackendKind, op: Op) -> OpStats {
        let cell = &self.cells[backend.index()][op.index()];
        OpStats {
            calls: cell.calls.load(Ordering::Relaxed),
            errors: cell.errors.load(Ordering::Relaxed),
            bytes_in: cell.bytes_in.load(Ordering::Relaxed),
            bytes_out: cell.bytes_out.load(Ordering::Relaxed),
            nanos: cell.nanos.load(Ordering::Relaxed),
        }
    }

    /// How many GPU failures were redone on the CPU.
    pub fn gpu_fallbacks(&self) -> u64 {
        self.gpu_fallbacks.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_backend_and_op() {
        let m = CodecMetrics::new();
        m.record(BackendKind::Gpu, Op::Encode, true, 100, 40, Duration::from_nanos(7));
        m.record(BackendKind::Gpu, Op::Encode, false, 5, 999, Duration::from_nanos(1));
        assert_eq!(
            m.get(BackendKind::Gpu, Op::Encode),
            OpStats {
                calls: 2,
                errors: 1,
                bytes_in: 105,
                bytes_out: 40,
                nanos: 8
            }
        );
        assert_eq!(m.get(BackendKind::Cpu, Op::Encode), OpStats::default());
        assert_eq!(m.get(BackendKind::Gpu, Op::Decode), OpStats::default());
    }
}
