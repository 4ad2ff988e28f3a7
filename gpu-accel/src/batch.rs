//! A batch: a header that says how many frames follow and how many bytes they take, then the frames.
//!
//! Layout (little-endian):
//!
//! | offset | size | field | meaning |
//! | --- | --- | --- | --- |
//! | 0 | 1 | magic | [`BATCH_MAGIC`] (`0xB6`) |
//! | 1 | 3 | reserved | 0 |
//! | 4 | 4 | frame_count | number of frames in the body |
//! | 8 | 8 | body_len | bytes of frames that follow the header |
//! | 16 | 4 | header_crc | CRC32 of bytes 0..16 |
//! | 20 | body_len | body | `frame_count` frames (see [`crate::frame`]) |
//!
//! Why a batch header on top of self-checking frames: a plain concatenation of frames that is cut exactly
//! at a frame boundary still parses, and would silently lose the buffers after the cut. The batch header
//! (itself checksummed) fixes the length and the frame count, so truncation at *any* length and trailing
//! garbage are errors. [`peek_batch_len`] lets a stream reader learn how many bytes to wait for from the
//! first 20. Plain concatenations of frames are still decodable (`decode_frames_into` on the backends) for
//! callers that append frames over time and delimit them some other way.
//!
//! A buffer longer than a backend's chunk length is carried by several frames; every frame but the last
//! has the `continues` flag, and the decoder joins them back into one buffer. An empty buffer is one empty
//! stored frame, so the number and order of buffers always survive a round trip.

use std::ops::Range;

use crate::error::CodecError;
use crate::frame::{seal_header, verified_header, FrameHeader, FRAME_HEADER_LEN};

/// First byte of every batch.
pub const BATCH_MAGIC: u8 = 0xB6;
/// Length of a batch header in bytes.
pub const BATCH_HEADER_LEN: usize = 20;
const WHAT: &str = "batch header";

/// A parsed and verified batch header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub frame_count: u32,
    pub body_len: u64,
}

impl BatchHeader {
    /// The header's wire form, including its checksum.
    pub fn to_bytes(&self) -> [u8; BATCH_HEADER_LEN] {
        let mut b = [0u8; BATCH_HEADER_LEN];
        b[0] = BATCH_MAGIC;
        b[4..8].copy_from_slice(&self.frame_count.to_le_bytes());
        b[8..16].copy_from_slice(&self.body_len.to_le_bytes());
        seal_header(&mut b);
        b
    }

    /// Parses and verifies the batch header at the start of `input`. Does not look at the body.
    pub fn parse(input: &[u8]) -> Result<Self, CodecError> {
        let b = verified_header::<BATCH_HEADER_LEN>(input, BATCH_MAGIC, WHAT, 0)?;
        if b[1..4] != [0, 0, 0] {
            return Err(CodecError::ReservedBits {
                what: WHAT,
                offset: 0,
                bits: u32::from_le_bytes([b[1], b[2], b[3], 0]),
            });
        }
        let frame_count = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let mut body_len = [0u8; 8];
        body_len.copy_from_slice(&b[8..16]);
        Ok(BatchHeader {
            frame_count,
            body_len: u64::from_le_bytes(body_len),
        })
    }
}

/// The total length (header included) of the batch whose first [`BATCH_HEADER_LEN`] bytes are `prefix`:
/// how many bytes a stream reader has to collect before calling a decoder.
pub fn peek_batch_len(prefix: &[u8]) -> Result<u64, CodecError> {
    let header = BatchHeader::parse(prefix)?;
    Ok(header.body_len.saturating_add(BATCH_HEADER_LEN as u64))
}

/// The result of decoding a batch: all buffers back to back in one allocation, and where each one is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecodedBatch {
    data: Vec<u8>,
    ranges: Vec<Range<usize>>,
}

impl DecodedBatch {
    /// Wraps a data vector and the ranges of the buffers in it.
    ///
    /// # Panics
    /// If a range lies outside `data` (a caller bug, not a data error).
    pub fn from_parts(data: Vec<u8>, ranges: Vec<Range<usize>>) -> Self {
        assert!(
            ranges.iter().all(|r| r.start <= r.end && r.end <= data.len()),
            "DecodedBatch ranges must lie inside the data"
        );
        DecodedBatch { data, ranges }
    }

    /// Number of buffers.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether the batch held no buffers at all.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The `i`-th buffer.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        self.ranges.get(i).map(|r| &self.data[r.clone()])
    }

    /// The buffers in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        self.ranges.iter().map(|r| &self.data[r.clone()])
    }

    /// All buffers back to back.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Where each buffer lies in [`DecodedBatch::data`].
    pub fn ranges(&self) -> &[Range<usize>] {
        &self.ranges
    }

    /// The data and the ranges.
    pub fn into_parts(self) -> (Vec<u8>, Vec<Range<usize>>) {
        (self.data, self.ranges)
    }

    /// Each buffer in a vector of its own (copies).
    pub fn to_vecs(&self) -> Vec<Vec<u8>> {
        self.iter().map(<[u8]>::to_vec).collect()
    }
}

/// One chunk of one input buffer, to become one frame.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Chunk<'a> {
    pub data: &'a [u8],
    pub continues: bool,
}

/// Splits every buffer into chunks of at most `chunk_len` bytes (an empty buffer is one empty chunk).
pub(crate) fn plan_chunks<'a>(bufs: &[&'a [u8]], chunk_len: usize) -> Vec<Chunk<'a>> {
    debug_assert!(chunk_len > 0);
    let mut chunks = Vec::with_capacity(bufs.iter().map(|b| b.len().div_ceil(chunk_len).max(1)).sum());
    for buf in bufs {
        if buf.is_empty() {
            chunks.push(Chunk {
                data: buf,
                continues: false,
            });
            continue;
        }
        let mut pieces = buf.chunks(chunk_len).peekable();
        while let Some(data) = pieces.next() {
            chunks.push(Chunk {
                data,
                continues: pieces.peek().is_some(),
            });
        }
    }
    chunks
}

/// The frame count that goes into a batch header, or the error for a batch that cannot have one.
pub(crate) fn frame_count(chunks: usize) -> Result<u32, CodecError> {
    u32::try_from(chunks).map_err(|_| CodecError::TooManyFrames {
        frames: chunks,
        max: u32::MAX,
    })
}

/// Writes the header of the batch whose body starts at `start + BATCH_HEADER_LEN` and runs to the end of
/// `out`, into the placeholder at `start`.
pub(crate) fn finish_batch(out: &mut [u8], start: usize, frame_count: u32) {
    let body_len = (out.len() - start - BATCH_HEADER_LEN) as u64;
    out[start..start + BATCH_HEADER_LEN].copy_from_slice(&BatchHeader { frame_count, body_len }.to_bytes());
}

/// A frame found by a scan: its verified header and where it lies in the input.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ScannedFrame {
    pub header: FrameHeader,
    /// Offset of the frame header in the input given to the decoder.
    pub offset: usize,
}

impl ScannedFrame {
    pub fn payload<'a>(&self, input: &'a [u8]) -> &'a [u8] {
        let start = self.offset + FRAME_HEADER_LEN;
        &input[start..start + self.header.payload_len as usize]
    }
}

/// Every frame of an input with verified headers, and the layout of the decoded output.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub frames: Vec<ScannedFrame>,
    /// Ranges of the decoded buffers, relative to the start of the decoded output.
    pub buffers: Vec<Range<usize>>,
    /// Bytes of decoded output: the sum of the frames' `raw_len`.
    pub total_raw: usize,
}

/// Scans a whole batch (header and body). Only headers are read; payloads are verified when decoded.
pub(crate) fn scan_batch(input: &[u8]) -> Result<Scan, CodecError> {
    let header = BatchHeader::parse(input)?;
    let available = input.len() - BATCH_HEADER_LEN;
    if header.body_len > available as u64 {
        return Err(CodecError::Truncated {
            offset: BATCH_HEADER_LEN,
            what: "batch body",
            needed: header.body_len,
            available,
        });
    }
    // `body_len <= available`, so it fits in a usize.
    let end = BATCH_HEADER_LEN + header.body_len as usize;
    if end < input.len() {
        return Err(CodecError::TrailingBytes {
            offset: end,
            count: input.len() - end,
        });
    }
    scan_frames(input, BATCH_HEADER_LEN, Some(header.frame_count))
}

/// Scans the frames in `input[start..]`. With `expected`, exactly that many frames must fill it.
pub(crate) fn scan_frames(input: &[u8], start: usize, expected: Option<u32>) -> Result<Scan, CodecError> {
    let body = input.len() - start;
    // Every frame takes at least a header, which bounds the allocation whatever the declared count.
    let capacity = expected.map_or(body / FRAME_HEADER_LEN, |n| (n as usize).min(body / FRAME_HEADER_LEN));
    let mut scan = Scan {
        frames: Vec::with_capacity(capacity),
        ..Scan::default()
    };
    let mut pos = start;
    let mut buffer_start = 0usize;
    while pos < input.len() {
        if expected.is_some_and(|n| scan.frames.len() == n as usize) {
            return Err(CodecError::TrailingBytes {
                offset: pos,
                count: input.len() - pos,
            });
        }
        let index = scan.frames.len();
        let header = FrameHeader::parse(&input[pos..], index, pos)?;
        scan.frames.push(ScannedFrame { header, offset: pos });
        // Each raw_len is at most 255 times its payload, which lies inside `input`: no overflow.
        scan.total_raw += header.raw_len as usize;
        if !header.continues {
            scan.buffers.push(buffer_start..scan.total_raw);
            buffer_start = scan.total_raw;
        }
        pos += header.frame_len();
    }
    if let Some(n) = expected {
        if scan.frames.len() != n as usize {
            return Err(CodecError::FrameCount {
                declared: n,
                found: scan.frames.len(),
            });
        }
    }
    if let Some(last) = scan.frames.last() {
        if last.header.continues {
            return Err(CodecError::DanglingContinuation {
                frame: scan.frames.len() - 1,
                offset: last.offset,
            });
        }
    }
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_buffer_boundaries() {
        let a = [1u8; 10];
        let chunks = plan_chunks(&[&a, &[], &a[..4]], 4);
        let shape: Vec<(usize, bool)> = chunks.iter().map(|c| (c.data.len(), c.continues)).collect();
        assert_eq!(shape, vec![(4, true), (4, true), (2, false), (0, false), (4, false)]);
    }

    #[test]
    fn batch_header_round_trips() {
        let h = BatchHeader {
            frame_count: 7,
            body_len: 1 << 40,
        };
        let bytes = h.to_bytes();
        assert_eq!(BatchHeader::parse(&bytes), Ok(h));
        assert_eq!(peek_batch_len(&bytes), Ok((1 << 40) + BATCH_HEADER_LEN as u64));
    }

    #[test]
    fn huge_declared_frame_count_does_not_allocate() {
        let bytes = BatchHeader {
            frame_count: u32::MAX,
            body_len: 0,
        }
        .to_bytes();
        assert_eq!(
            scan_batch(&bytes).err(),
            Some(CodecError::FrameCount {
                declared: u32::MAX,
                found: 0
            })
        );
    }
}
