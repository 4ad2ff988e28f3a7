//! The CPU backend: always available, and the reference every other backend must agree with.
//!
//! Work is split into independent tasks that never share state:
//! - encoding: buffers are cut into chunks of [`CpuBackend::chunk_len`] bytes (default
//!   [`DEFAULT_CHUNK_LEN`]), one frame per chunk, linked by the frame's `continues` flag, so even one huge
//!   buffer (a snapshot) is spread over all cores; consecutive small chunks are grouped into tasks of about
//!   64 KiB so that tiny buffers do not pay a task each;
//! - checksumming: the same chunks are hashed separately and their CRCs joined with
//!   `crc32fast::Hasher::combine`, which gives exactly the CRC of the whole buffer;
//! - decoding: every frame decodes straight into its own disjoint slice of the output, no copies.
//!
//! Batches smaller than [`CpuBackend::parallel_threshold`] (default [`DEFAULT_PARALLEL_THRESHOLD`]) run on
//! the calling thread, because handing work to a pool costs microseconds that a small batch does not repay;
//! checksums, far cheaper per byte, have their own, higher threshold
//! ([`DEFAULT_CHECKSUM_PARALLEL_THRESHOLD`]).
//! The thread count is fixed at construction: [`CpuBackend::single_threaded`] never uses a pool (so it
//! measures one core), [`CpuBackend::all_cores`] owns a dedicated rayon pool with one thread per core (not
//! rayon's global pool, so the codec neither competes with nor depends on other rayon users).
//!
//! The encoding depends only on the chunk length, never on the thread count or the threshold: every
//! configuration with the same chunk length produces byte-identical batches.

use std::num::NonZeroUsize;
use std::ops::Range;
use std::sync::Arc;

use rayon::prelude::*;
use rayon::ThreadPool;

use crate::batch::{finish_batch, frame_count, plan_chunks, scan_batch, scan_frames, Chunk, Scan, ScannedFrame};
use crate::batch::{DecodedBatch, BATCH_HEADER_LEN};
use crate::error::CodecError;
use crate::frame::{decode_payload, encode_frame, max_frame_len, FRAME_HEADER_LEN, MAX_FRAME_LEN};
use crate::{Backend, BackendKind};

/// Below this many bytes per batch the CPU backend stays on the calling thread. 256 KiB is about half a
/// millisecond of LZ4 work on one core, well above the few microseconds it costs to wake a pool.
pub const DEFAULT_PARALLEL_THRESHOLD: usize = 256 * 1024;

/// Below this many bytes per batch `checksum_batch` stays on the calling thread. CRC32 runs at tens
/// of GB/s on one core, so a 1 MiB batch takes about 20 µs and waking the pool halved its speed
/// (55 vs 28 GB/s, `docs/benchmarks.md`); from 16 MiB on the pool was ahead.
pub const DEFAULT_CHECKSUM_PARALLEL_THRESHOLD: usize = 8 << 20;

/// Default chunk length (bytes per frame) of the CPU backend: 1 MiB. LZ4 only looks 64 KiB back, so
/// cutting buffers at 1 MiB costs almost no compression, and the frame header adds 24 bytes per MiB.
pub const DEFAULT_CHUNK_LEN: usize = 1 << 20;

/// Consecutive chunks are grouped into parallel tasks of at least this many bytes.
const TASK_BYTES: usize = 64 * 1024;

/// Input bytes encoded per wave of parallel tasks (see `encode_chunks`).
const WAVE_BYTES: usize = 16 << 20;

/// The CPU backend. Cheap to clone (the pool is shared).
#[derive(Clone, Debug)]
pub struct CpuBackend {
    pool: Option<Arc<ThreadPool>>,
    threads: usize,
    parallel_threshold: usize,
    checksum_parallel_threshold: usize,
    chunk_len: usize,
}

impl CpuBackend {
    /// Everything on the calling thread, always.
    pub fn single_threaded() -> Self {
        CpuBackend {
            pool: None,
            threads: 1,
            parallel_threshold: DEFAULT_PARALLEL_THRESHOLD,
            checksum_parallel_threshold: DEFAULT_CHECKSUM_PARALLEL_THRESHOLD,
            chunk_len: DEFAULT_CHUNK_LEN,
        }
    }

    /// A dedicated pool with one thread per available core (as `std::thread::available_parallelism`
    /// reports it; one when that is unknown).
    pub fn all_cores() -> Result<Self, CodecError> {
        Self::with_threads(std::thread::available_parallelism().map_or(1, NonZeroUsize::get))
    }

    /// A dedicated pool of `threads` threads; 0 or 1 means [`CpuBackend::single_threaded`].
    pub fn with_threads(threads: usize) -> Result<Self, CodecError> {
        if threads <= 1 {
            return Ok(Self::single_threaded());
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("basalt-codec-{i}"))
            .build()
            .map_err(|e| CodecError::ThreadPool {
                threads,
                detail: e.to_string(),
            })?;
        Ok(CpuBackend {
            pool: Some(Arc::new(pool)),
            threads,
            ..Self::single_threaded()
        })
    }

    /// Sets the batch size (bytes) from which the pool encodes and decodes.
    pub fn with_parallel_threshold(mut self, bytes: usize) -> Self {
        self.parallel_threshold = bytes;
        self
    }

    /// Sets the batch size (bytes) from which the pool computes checksums.
    pub fn with_checksum_parallel_threshold(mut self, bytes: usize) -> Self {
        self.checksum_parallel_threshold = bytes;
        self
    }

    /// Sets the chunk length (bytes per frame), clamped to `1..=MAX_FRAME_LEN`.
    pub fn with_chunk_len(mut self, bytes: usize) -> Self {
        self.chunk_len = bytes.clamp(1, MAX_FRAME_LEN);
        self
    }

    /// Threads this backend uses for large batches.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Batch size (bytes) from which the pool encodes and decodes.
    pub fn parallel_threshold(&self) -> usize {
        self.parallel_threshold
    }

    /// Batch size (bytes) from which the pool computes checksums.
    pub fn checksum_parallel_threshold(&self) -> usize {
        self.checksum_parallel_threshold
    }

    /// Bytes per frame when encoding.
    pub fn chunk_len(&self) -> usize {
        self.chunk_len
    }

    /// Appends the frames for `bufs` to `out` without a batch header, and returns how many bytes it
    /// appended: for callers that append frames to a stream over time and delimit it some other way.
    /// Decode with [`CpuBackend::decode_frames_into`]. Prefer batches: a cut at a frame boundary of a
    /// plain concatenation goes unnoticed.
    pub fn encode_frames_into(&self, bufs: &[&[u8]], out: &mut Vec<u8>) -> usize {
        let start = out.len();
        self.encode_chunks(&plan_chunks(bufs, self.chunk_len), out);
        out.len() - start
    }

    /// Decodes a plain concatenation of frames (no batch header), appending the buffers to `out` and
    /// returning where each one lies in it. Unlike a batch, a concatenation cut exactly at a frame boundary
    /// cannot be told from a shorter one; a cut anywhere else is an error. On error `out` is left as it was.
    pub fn decode_frames_into(&self, frames: &[u8], out: &mut Vec<u8>) -> Result<Vec<Range<usize>>, CodecError> {
        let scan = scan_frames(frames, 0, None)?;
        self.decode_scan(frames, &scan, out)
    }

    /// [`CpuBackend::decode_frames_into`] into a fresh [`DecodedBatch`].
    pub fn decode_frames(&self, frames: &[u8]) -> Result<DecodedBatch, CodecError> {
        let mut data = Vec::new();
        let ranges = self.decode_frames_into(frames, &mut data)?;
        Ok(DecodedBatch::from_parts(data, ranges))
    }

    /// The pool, if coding a batch of `bytes` bytes is worth spreading over it.
    fn pool_for(&self, bytes: usize) -> Option<&ThreadPool> {
        self.pool.as_deref().filter(|_| bytes >= self.parallel_threshold)
    }

    /// Appends one frame per chunk to `out`, on the pool when the chunks are large enough together.
    fn encode_chunks(&self, chunks: &[Chunk<'_>], out: &mut Vec<u8>) {
        let total: usize = chunks.iter().map(|c| c.data.len()).sum();
        let Some(pool) = self.pool_for(total) else {
            for chunk in chunks {
                encode_frame(chunk.data, chunk.continues, out);
            }
            return;
        };
        // Groups are encoded in waves of about WAVE_BYTES: the pool encodes a wave's groups into
        // per-group buffers, which are then appended to `out` in order and reused by the next wave.
        // Encoding a whole batch at once would keep every group's buffer alive until the end: for a
        // 1 GiB batch that is 1 GiB of fresh memory to fault in, and all-core encoding fell below one
        // core at 1 GiB. Reserving (not filling) the worst case up front keeps `out` from being
        // copied as it grows.
        out.reserve(chunks.iter().map(|c| max_frame_len(c.data.len())).sum());
        let groups = group_chunks(chunks);
        let mut parts: Vec<Vec<u8>> = Vec::new();
        for wave in waves(&groups) {
            if parts.len() < wave.len() {
                parts.resize_with(wave.len(), Vec::new);
            }
            let parts = &mut parts[..wave.len()];
            pool.install(|| {
                wave.par_iter().zip(parts.par_iter_mut()).for_each(|(group, part)| {
                    part.clear();
                    for chunk in *group {
                        encode_frame(chunk.data, chunk.continues, part);
                    }
                })
            });
            for part in parts.iter() {
                out.extend_from_slice(part);
            }
        }
    }

    pub(crate) fn decode_scan(
        &self,
        input: &[u8],
        scan: &Scan,
        out: &mut Vec<u8>,
    ) -> Result<Vec<Range<usize>>, CodecError> {
        let start = out.len();
        out.resize(start + scan.total_raw, 0);
        let result = {
            let mut rest = &mut out[start..];
            let mut jobs: Vec<(usize, &ScannedFrame, &mut [u8])> = Vec::with_capacity(scan.frames.len());
            for (i, frame) in scan.frames.iter().enumerate() {
                let (dst, tail) = std::mem::take(&mut rest).split_at_mut(frame.header.raw_len as usize);
                jobs.push((i, frame, dst));
                rest = tail;
            }
            let run = |(i, frame, dst): (usize, &ScannedFrame, &mut [u8])| {
                decode_payload(&frame.header, frame.payload(input), dst, i, frame.offset)
            };
            match self.pool_for(scan.total_raw.max(input.len())) {
                None => jobs.into_iter().try_for_each(run),
                // The first error in frame order, so that the reported error does not depend on scheduling.
                Some(pool) => pool
                    .install(|| jobs.into_par_iter().map(run).find_first(Result::is_err))
                    .unwrap_or(Ok(())),
            }
        };
        match result {
            Ok(()) => Ok(scan.buffers.iter().map(|r| start + r.start..start + r.end).collect()),
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }
}

/// Cuts `groups` into consecutive waves of at least `WAVE_BYTES` input bytes (the last may be
/// smaller).
fn waves<'g, 'c, 'a>(groups: &'g [&'c [Chunk<'a>]]) -> impl Iterator<Item = &'g [&'c [Chunk<'a>]]> {
    let mut rest = groups;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let len = rest
            .iter()
            .position(|g| {
                bytes += g.iter().map(|c| c.data.len()).sum::<usize>();
                bytes >= WAVE_BYTES
            })
            .map_or(rest.len(), |i| i + 1);
        let (wave, tail) = rest.split_at(len);
        rest = tail;
        Some(wave)
    })
}

/// Cuts `chunks` into consecutive groups of at least `TASK_BYTES` bytes (the last may be smaller).
fn group_chunks<'c, 'a>(chunks: &'c [Chunk<'a>]) -> Vec<&'c [Chunk<'a>]> {
    let mut groups = Vec::new();
    let (mut begin, mut bytes) = (0, 0);
    for (i, chunk) in chunks.iter().enumerate() {
        bytes += chunk.data.len() + FRAME_HEADER_LEN;
        if bytes >= TASK_BYTES {
            groups.push(&chunks[begin..=i]);
            (begin, bytes) = (i + 1, 0);
        }
    }
    if begin < chunks.len() {
        groups.push(&chunks[begin..]);
    }
    groups
}

impl Backend for CpuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }

    fn checksum_batch(&self, bufs: &[&[u8]]) -> Result<Vec<u32>, CodecError> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let pool = self
            .pool
            .as_deref()
            .filter(|_| total >= self.checksum_parallel_threshold);
        let Some(pool) = pool else {
            return Ok(bufs.iter().map(|b| crc32fast::hash(b)).collect());
        };
        let chunks = plan_chunks(bufs, self.chunk_len);
        let hashers: Vec<crc32fast::Hasher> = pool.install(|| {
            chunks
                .par_iter()
                .map(|c| {
                    let mut h = crc32fast::Hasher::new();
                    h.update(c.data);
                    h
                })
                .collect()
        });
        let mut crcs = Vec::with_capacity(bufs.len());
        let mut whole = crc32fast::Hasher::new();
        for (chunk, part) in chunks.iter().zip(&hashers) {
            whole.combine(part);
            if !chunk.continues {
                crcs.push(std::mem::take(&mut whole).finalize());
            }
        }
        Ok(crcs)
    }

    fn encode_batch(&self, bufs: &[&[u8]], out: &mut Vec<u8>) -> Result<usize, CodecError> {
        let chunks = plan_chunks(bufs, self.chunk_len);
        let count = frame_count(chunks.len())?;
        let start = out.len();
        out.resize(start + BATCH_HEADER_LEN, 0);
        self.encode_chunks(&chunks, out);
        finish_batch(out, start, count);
        Ok(out.len() - start)
    }

    fn decode_batch_into(&self, batch: &[u8], out: &mut Vec<u8>) -> Result<Vec<Range<usize>>, CodecError> {
        let scan = scan_batch(batch)?;
        self.decode_scan(batch, &scan, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_cover_all_chunks_in_order() {
        let data = vec![7u8; 300 * 1024];
        let bufs: Vec<&[u8]> = vec![&data[..10], &data, &[], &data[..100]];
        let chunks = plan_chunks(&bufs, 50 * 1024);
        let groups = group_chunks(&chunks);
        let flat: Vec<usize> = groups.iter().flat_map(|g| g.iter().map(|c| c.data.len())).collect();
        let expected: Vec<usize> = chunks.iter().map(|c| c.data.len()).collect();
        assert_eq!(flat, expected);
        assert!(groups.len() > 1);
    }

    #[test]
    fn waves_cover_all_groups_in_order_and_only_the_last_is_short() {
        let data = vec![3u8; 5 << 20];
        let bufs: Vec<&[u8]> = (0..9).map(|_| &data[..]).collect();
        let chunks = plan_chunks(&bufs, DEFAULT_CHUNK_LEN);
        let groups = group_chunks(&chunks);
        let waves: Vec<_> = waves(&groups).collect();
        let bytes = |w: &[&[Chunk<'_>]]| w.iter().flat_map(|g| g.iter()).map(|c| c.data.len()).sum::<usize>();
        assert_eq!(waves.iter().map(|w| w.len()).sum::<usize>(), groups.len());
        assert!(waves.len() > 2, "45 MiB in waves of 16 MiB");
        for wave in &waves[..waves.len() - 1] {
            assert!(bytes(wave) >= WAVE_BYTES);
        }
        let flat: Vec<*const Chunk<'_>> = waves.iter().flat_map(|w| w.iter()).map(|g| g.as_ptr()).collect();
        let expected: Vec<*const Chunk<'_>> = groups.iter().map(|g| g.as_ptr()).collect();
        assert_eq!(flat, expected);
        assert_eq!(super::waves(&[]).count(), 0);
    }

    #[test]
    fn a_batch_of_several_waves_encodes_as_on_one_thread() {
        // Over two waves of mixed compressible and incompressible buffers.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let bufs: Vec<Vec<u8>> = (0..40)
            .map(|i| {
                (0..(1 << 20) + i * 777)
                    .map(|j| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        if i % 2 == 0 {
                            (j % 61) as u8
                        } else {
                            x as u8
                        }
                    })
                    .collect()
            })
            .collect();
        let refs: Vec<&[u8]> = bufs.iter().map(Vec::as_slice).collect();
        let (mut one, mut all) = (Vec::new(), vec![0xAA; 5]);
        CpuBackend::single_threaded()
            .encode_batch(&refs, &mut one)
            .expect("encodes");
        let pool = CpuBackend::with_threads(3).expect("thread pool starts");
        pool.encode_batch(&refs, &mut all).expect("encodes");
        assert_eq!(&all[..5], &[0xAA; 5], "what `out` held is kept");
        assert!(all[5..] == one[..], "identical bytes whatever the thread count");
    }

    #[test]
    fn with_threads_one_is_single_threaded() {
        let b = CpuBackend::with_threads(1).expect("no pool to start");
        assert_eq!(b.threads(), 1);
        assert!(b.pool.is_none());
    }
}
