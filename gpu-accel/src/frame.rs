//! One frame: the unit that is checksummed, compressed and verified.
//!
//! A frame carries one chunk of one buffer. All integers are little-endian.
//!
//! | offset | size | field | meaning |
//! | --- | --- | --- | --- |
//! | 0 | 1 | magic | [`FRAME_MAGIC`] (`0xB7`) |
//! | 1 | 1 | codec | [`CodecId`]: 0 = stored (uncompressed), 1 = LZ4 block |
//! | 2 | 1 | flags | bit 0 = `continues`: the next frame carries the rest of the same buffer; other bits 0 |
//! | 3 | 1 | reserved | 0 |
//! | 4 | 4 | raw_len | uncompressed length, at most [`MAX_FRAME_LEN`] |
//! | 8 | 4 | payload_len | length of the payload that follows the header |
//! | 12 | 4 | raw_crc | CRC32 (IEEE, as `crc32fast`) of the uncompressed bytes |
//! | 16 | 4 | payload_crc | CRC32 of the payload bytes as stored (equal to `raw_crc` for a stored frame) |
//! | 20 | 4 | header_crc | CRC32 of bytes 0..20 |
//! | 24 | payload_len | payload | the bytes, or one LZ4 block (the format `lz4_flex::block` reads) |
//!
//! Invariants a decoder checks, in this order, before it trusts anything:
//! - the header is complete and its magic and `header_crc` are right, so a flipped bit in bytes 0..24 is
//!   caught before a length or a codec is used;
//! - flags and reserved bits are known, the codec is known, both lengths are at most [`MAX_FRAME_LEN`];
//! - a stored frame has `payload_len == raw_len` and `payload_crc == raw_crc`; an LZ4 frame has
//!   `payload_len < raw_len` (the encoder only compresses when that shrinks the chunk) and
//!   `raw_len <= payload_len * LZ4_MAX_EXPANSION` (more is impossible for an LZ4 block), so a forged
//!   length can never make the decoder allocate more than 255 times the bytes it was given;
//! - the payload is present in full: `payload_len` is checked against the bytes actually available;
//! - `payload_crc` matches before an LZ4 payload is decompressed, so any flipped payload bit is caught
//!   deterministically (CRC32 detects every single-bit error), not merely with probability 1 - 2^-32;
//! - the payload decompresses to exactly `raw_len` bytes whose CRC32 is `raw_crc` (end to end: this also
//!   catches a compressor bug, on the CPU or the GPU).
//!
//! The overhead is 24 bytes per frame, so callers should batch small records into buffers of at least a
//! few KiB rather than framing each one.

use crate::error::CodecError;

/// First byte of every frame.
pub const FRAME_MAGIC: u8 = 0xB7;
/// Length of a frame header in bytes.
pub const FRAME_HEADER_LEN: usize = 24;
/// The largest uncompressed (and payload) length of one frame: 1 GiB. Encoders split larger buffers into
/// several frames linked by the `continues` flag; decoders reject larger lengths before allocating.
pub const MAX_FRAME_LEN: usize = 1 << 30;
/// An LZ4 block cannot decode to more than 255 bytes per input byte (a match costs at least one byte
/// per 255 bytes of length), so larger claimed ratios are rejected as corrupt.
pub const LZ4_MAX_EXPANSION: u64 = 255;
/// LZ4 stores inputs shorter than this as literals only, which never shrinks them; such chunks are not
/// handed to the compressor at all.
pub(crate) const LZ4_MIN_INPUT: usize = 13;

const FLAG_CONTINUES: u8 = 0b0000_0001;
const WHAT: &str = "frame header";

/// How a frame's payload is coded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CodecId {
    /// The payload is the uncompressed bytes.
    Stored,
    /// The payload is one LZ4 block (no LZ4 frame header, no size prefix).
    Lz4Block,
}

impl CodecId {
    /// The id written in byte 1 of a frame header.
    pub const fn id(self) -> u8 {
        match self {
            CodecId::Stored => 0,
            CodecId::Lz4Block => 1,
        }
    }

    /// The codec with the given id, if this version knows it.
    pub const fn from_id(id: u8) -> Option<Self> {
        match id {
            0 => Some(CodecId::Stored),
            1 => Some(CodecId::Lz4Block),
            _ => None,
        }
    }
}

/// Writes the CRC32 of a header's other bytes into its last four: how frame and batch headers
/// protect themselves.
pub(crate) fn seal_header<const N: usize>(b: &mut [u8; N]) {
    let crc = crc32fast::hash(&b[..N - 4]);
    b[N - 4..].copy_from_slice(&crc.to_le_bytes());
}

/// The `N`-byte header at the start of `input`, once it is known to be there in full, to start
/// with `magic` and to carry the right CRC in its last four bytes ([`seal_header`]); in that
/// order, so no field of a damaged header is ever looked at. `what` and `offset` label errors.
pub(crate) fn verified_header<'a, const N: usize>(
    input: &'a [u8],
    magic: u8,
    what: &'static str,
    offset: usize,
) -> Result<&'a [u8; N], CodecError> {
    let Some(b) = input.first_chunk::<N>() else {
        return Err(CodecError::Truncated {
            offset,
            what,
            needed: N as u64,
            available: input.len(),
        });
    };
    if b[0] != magic {
        return Err(CodecError::BadMagic {
            what,
            offset,
            found: b[0],
            expected: magic,
        });
    }
    let stored = u32::from_le_bytes([b[N - 4], b[N - 3], b[N - 2], b[N - 1]]);
    let computed = crc32fast::hash(&b[..N - 4]);
    if stored != computed {
        return Err(CodecError::HeaderChecksum {
            what,
            offset,
            stored,
            computed,
        });
    }
    Ok(b)
}

/// A parsed and verified frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub codec: CodecId,
    /// The next frame carries the rest of the same buffer.
    pub continues: bool,
    pub raw_len: u32,
    pub payload_len: u32,
    pub raw_crc: u32,
    pub payload_crc: u32,
}

impl FrameHeader {
    /// The header's wire form, including its checksum.
    pub fn to_bytes(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[0] = FRAME_MAGIC;
        b[1] = self.codec.id();
        b[2] = if self.continues { FLAG_CONTINUES } else { 0 };
        b[4..8].copy_from_slice(&self.raw_len.to_le_bytes());
        b[8..12].copy_from_slice(&self.payload_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.raw_crc.to_le_bytes());
        b[16..20].copy_from_slice(&self.payload_crc.to_le_bytes());
        seal_header(&mut b);
        b
    }

    /// Parses and verifies the header at the start of `input` (which runs to the end of the available
    /// bytes), including that its payload is present. `frame` and `offset` only label errors.
    pub fn parse(input: &[u8], frame: usize, offset: usize) -> Result<Self, CodecError> {
        let b = verified_header::<FRAME_HEADER_LEN>(input, FRAME_MAGIC, WHAT, offset)?;
        if b[2] & !FLAG_CONTINUES != 0 || b[3] != 0 {
            return Err(CodecError::ReservedBits {
                what: WHAT,
                offset,
                bits: u32::from_le_bytes([b[2], b[3], 0, 0]),
            });
        }
        let codec = CodecId::from_id(b[1]).ok_or(CodecError::UnknownCodec {
            frame,
            offset,
            codec: b[1],
        })?;
        let header = FrameHeader {
            codec,
            continues: b[2] & FLAG_CONTINUES != 0,
            raw_len: le32(b, 4),
            payload_len: le32(b, 8),
            raw_crc: le32(b, 12),
            payload_crc: le32(b, 16),
        };
        let invalid = |reason| CodecError::InvalidHeader {
            frame,
            offset,
            raw_len: header.raw_len,
            payload_len: header.payload_len,
            reason,
        };
        if header.raw_len as usize > MAX_FRAME_LEN || header.payload_len as usize > MAX_FRAME_LEN {
            return Err(invalid("length above the 1 GiB frame limit"));
        }
        match codec {
            CodecId::Stored if header.payload_len != header.raw_len => {
                return Err(invalid(
                    "a stored frame's payload length must equal its uncompressed length",
                ));
            }
            CodecId::Stored if header.payload_crc != header.raw_crc => {
                return Err(invalid(
                    "a stored frame's payload checksum must equal its data checksum",
                ));
            }
            CodecId::Lz4Block if header.payload_len >= header.raw_len => {
                return Err(invalid("an LZ4 payload must be shorter than the data it encodes"));
            }
            CodecId::Lz4Block if u64::from(header.raw_len) > u64::from(header.payload_len) * LZ4_MAX_EXPANSION => {
                return Err(invalid("an LZ4 block cannot expand more than 255-fold"));
            }
            _ => {}
        }
        let available = input.len() - FRAME_HEADER_LEN;
        if header.payload_len as usize > available {
            return Err(CodecError::Truncated {
                offset: offset + FRAME_HEADER_LEN,
                what: "frame payload",
                needed: u64::from(header.payload_len),
                available,
            });
        }
        Ok(header)
    }

    /// Length of the whole frame, header included.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN + self.payload_len as usize
    }
}

fn le32(b: &[u8; FRAME_HEADER_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Most bytes the frame of a `len`-byte chunk can take: the header plus LZ4's worst case (which is
/// never less than the chunk itself, the stored fallback).
pub(crate) fn max_frame_len(len: usize) -> usize {
    let payload = if len >= LZ4_MIN_INPUT {
        lz4_flex::block::get_maximum_output_size(len).max(len)
    } else {
        len
    };
    FRAME_HEADER_LEN + payload
}

/// Appends the frame of `chunk` to `out`: LZ4 when that makes it shorter, stored otherwise.
///
/// `chunk` must be at most [`MAX_FRAME_LEN`] bytes; every caller splits buffers into chunks first.
pub(crate) fn encode_frame(chunk: &[u8], continues: bool, out: &mut Vec<u8>) {
    let raw_len = chunk_len_u32(chunk);
    let raw_crc = crc32fast::hash(chunk);
    let mut header = FrameHeader {
        codec: CodecId::Stored,
        continues,
        raw_len,
        payload_len: raw_len,
        raw_crc,
        payload_crc: raw_crc,
    };
    let start = out.len();
    let payload_start = start + FRAME_HEADER_LEN;
    out.resize(start + max_frame_len(chunk.len()), 0);
    // `compress_into` only fails when the output is shorter than `get_maximum_output_size`, which
    // `max_frame_len` rules out; should it fail anyway, the chunk is simply stored.
    let compressed = if chunk.len() >= LZ4_MIN_INPUT {
        lz4_flex::block::compress_into(chunk, &mut out[payload_start..])
            .ok()
            .filter(|&n| n < chunk.len())
    } else {
        None
    };
    match compressed {
        Some(n) => {
            out.truncate(payload_start + n);
            let payload = &out[payload_start..];
            header.codec = CodecId::Lz4Block;
            header.payload_len = chunk_len_u32(payload);
            header.payload_crc = crc32fast::hash(payload);
        }
        None => {
            out.truncate(payload_start);
            out.extend_from_slice(chunk);
        }
    }
    out[start..payload_start].copy_from_slice(&header.to_bytes());
}

/// Appends a frame whose header fields were computed elsewhere (by the GPU backend).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn push_frame(out: &mut Vec<u8>, header: &FrameHeader, payload: &[u8]) {
    debug_assert_eq!(header.payload_len as usize, payload.len());
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(payload);
}

fn chunk_len_u32(chunk: &[u8]) -> u32 {
    assert!(
        chunk.len() <= MAX_FRAME_LEN,
        "invariant: buffers are split into chunks of at most MAX_FRAME_LEN bytes"
    );
    chunk.len() as u32
}

/// `Ok` when `bytes` hash to `stored`; otherwise the error `mismatch` makes of the stored and the
/// computed CRC.
fn check_crc(bytes: &[u8], stored: u32, mismatch: impl FnOnce(u32, u32) -> CodecError) -> Result<(), CodecError> {
    let computed = crc32fast::hash(bytes);
    if computed == stored {
        Ok(())
    } else {
        Err(mismatch(stored, computed))
    }
}

/// Verifies `payload` against `header` and decodes it into `dst`, which is exactly `raw_len` bytes long.
/// `frame` and `offset` (of the frame's header) only label errors.
pub(crate) fn decode_payload(
    header: &FrameHeader,
    payload: &[u8],
    dst: &mut [u8],
    frame: usize,
    offset: usize,
) -> Result<(), CodecError> {
    debug_assert_eq!(payload.len(), header.payload_len as usize);
    debug_assert_eq!(dst.len(), header.raw_len as usize);
    let data_checksum = |stored, computed| CodecError::DataChecksum {
        frame,
        offset,
        stored,
        computed,
    };
    match header.codec {
        CodecId::Stored => {
            check_crc(payload, header.raw_crc, data_checksum)?;
            dst.copy_from_slice(payload);
        }
        CodecId::Lz4Block => {
            check_crc(payload, header.payload_crc, |stored, computed| {
                CodecError::PayloadChecksum {
                    frame,
                    offset,
                    stored,
                    computed,
                }
            })?;
            let n = lz4_flex::block::decompress_into(payload, dst).map_err(|e| CodecError::Decompress {
                frame,
                offset,
                reason: e.to_string(),
            })?;
            if n != dst.len() {
                return Err(CodecError::LengthMismatch {
                    frame,
                    offset,
                    expected: header.raw_len,
                    actual: n,
                });
            }
            check_crc(dst, header.raw_crc, data_checksum)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_frame(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(data, false, &mut out);
        out
    }

    #[test]
    fn compressible_chunk_uses_lz4_and_incompressible_is_stored() {
        let zeros = vec![0u8; 4096];
        let f = one_frame(&zeros);
        let h = FrameHeader::parse(&f, 0, 0).expect("valid frame");
        assert_eq!(h.codec, CodecId::Lz4Block);
        assert!(f.len() < 200, "4 KiB of zeros should shrink a lot, got {}", f.len());

        let short = b"abc";
        let f = one_frame(short);
        let h = FrameHeader::parse(&f, 0, 0).expect("valid frame");
        assert_eq!(h.codec, CodecId::Stored);
        assert_eq!(&f[FRAME_HEADER_LEN..], short);
    }

    #[test]
    fn header_round_trips_and_is_exactly_24_bytes() {
        let h = FrameHeader {
            codec: CodecId::Lz4Block,
            continues: true,
            raw_len: 1000,
            payload_len: 10,
            raw_crc: 0xdead_beef,
            payload_crc: 0x0123_4567,
        };
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(&[0; 10]);
        assert_eq!(FrameHeader::parse(&bytes, 0, 0), Ok(h));
    }

    #[test]
    fn forged_lengths_are_rejected_before_allocation() {
        let forge = |codec: CodecId, raw_len: u32, payload_len: u32| {
            let h = FrameHeader {
                codec,
                continues: false,
                raw_len,
                payload_len,
                raw_crc: 0,
                payload_crc: 0,
            };
            let mut bytes = h.to_bytes().to_vec();
            bytes.resize(FRAME_HEADER_LEN + 64, 0);
            FrameHeader::parse(&bytes, 0, 0)
        };
        assert!(matches!(
            forge(CodecId::Lz4Block, u32::MAX, 10),
            Err(CodecError::InvalidHeader { .. })
        ));
        assert!(matches!(
            forge(CodecId::Lz4Block, 10 * 256, 10),
            Err(CodecError::InvalidHeader { .. })
        ));
        assert!(matches!(
            forge(CodecId::Lz4Block, 10, 10),
            Err(CodecError::InvalidHeader { .. })
        ));
        assert!(matches!(
            forge(CodecId::Stored, 11, 10),
            Err(CodecError::InvalidHeader { .. })
        ));
        // Plausible lengths, but more payload than there are bytes.
        assert!(matches!(
            forge(CodecId::Lz4Block, 1000, 100),
            Err(CodecError::Truncated { .. })
        ));
        assert!(forge(CodecId::Lz4Block, 1000, 64).is_ok());
    }
}
