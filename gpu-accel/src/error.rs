//! The one error type of the crate.
//!
//! Decoding reads bytes that crossed a network, so every way in which they can be wrong has a variant
//! of its own and carries where it was found: the byte offset in the input and, for per-frame problems,
//! the frame's index. A decoder never returns data it could not verify; it returns one of these.
//! Device problems (no GPU, a failing driver call) have their own variants so that the dispatcher can
//! tell "the GPU failed, use the CPU" apart from "the input is corrupt".

use thiserror::Error;

/// Everything that can go wrong while encoding, decoding or checksumming a batch.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    /// The input ends before a header or payload that it announces.
    #[error("input truncated at byte {offset}: the {what} needs {needed} bytes but only {available} remain")]
    Truncated {
        offset: usize,
        what: &'static str,
        needed: u64,
        available: usize,
    },

    /// The first byte of a header is not the expected magic byte: not a frame/batch, or misaligned.
    #[error("{what} at byte {offset}: bad magic byte {found:#04x}, expected {expected:#04x}")]
    BadMagic {
        what: &'static str,
        offset: usize,
        found: u8,
        expected: u8,
    },

    /// The CRC32 stored in a header does not match the header's bytes.
    #[error("{what} at byte {offset}: header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderChecksum {
        what: &'static str,
        offset: usize,
        stored: u32,
        computed: u32,
    },

    /// A header with a valid checksum uses flag or reserved bits this version does not know.
    #[error("{what} at byte {offset}: unknown flag or reserved bits set ({bits:#010x})")]
    ReservedBits {
        what: &'static str,
        offset: usize,
        bits: u32,
    },

    /// A frame names a codec this version does not know.
    #[error("frame {frame} at byte {offset}: unknown codec id {codec}")]
    UnknownCodec { frame: usize, offset: usize, codec: u8 },

    /// A frame's lengths are impossible (too large, or inconsistent with its codec).
    #[error(
        "frame {frame} at byte {offset}: invalid header: {reason} (uncompressed {raw_len} bytes, payload {payload_len} bytes)"
    )]
    InvalidHeader {
        frame: usize,
        offset: usize,
        raw_len: u32,
        payload_len: u32,
        reason: &'static str,
    },

    /// The CRC32 of a compressed payload does not match its header.
    #[error(
        "frame {frame} at byte {offset}: payload checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
    )]
    PayloadChecksum {
        frame: usize,
        offset: usize,
        stored: u32,
        computed: u32,
    },

    /// The LZ4 decoder rejected a payload.
    #[error("frame {frame} at byte {offset}: corrupt LZ4 payload: {reason}")]
    Decompress {
        frame: usize,
        offset: usize,
        reason: String,
    },

    /// A payload decompressed to a different length than its header announces.
    #[error("frame {frame} at byte {offset}: decompressed to {actual} bytes, the header says {expected}")]
    LengthMismatch {
        frame: usize,
        offset: usize,
        expected: u32,
        actual: usize,
    },

    /// The CRC32 of the decoded (uncompressed) bytes does not match the header.
    #[error(
        "frame {frame} at byte {offset}: data checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
    )]
    DataChecksum {
        frame: usize,
        offset: usize,
        stored: u32,
        computed: u32,
    },

    /// A batch's body holds fewer frames than its header declares.
    #[error("batch declares {declared} frames but its body holds only {found}")]
    FrameCount { declared: u32, found: usize },

    /// Bytes follow the end of a batch (or the declared frames of a batch body).
    #[error("{count} unexpected trailing bytes at byte {offset}")]
    TrailingBytes { offset: usize, count: usize },

    /// The last frame says that its buffer continues in a next frame, and there is none.
    #[error("frame {frame} at byte {offset} says its buffer continues, but it is the last frame")]
    DanglingContinuation { frame: usize, offset: usize },

    /// A batch would need more frames than the batch header can count.
    #[error("a batch of {frames} frames cannot be encoded: at most {max} fit in the batch header")]
    TooManyFrames { frames: usize, max: u32 },

    /// The GPU backend cannot be used on this machine (or in this build).
    #[error("GPU backend unavailable: {0}")]
    GpuUnavailable(String),

    /// A GPU operation failed at run time (driver error, out of device memory, a panic inside the bindings).
    #[error("GPU {op} failed: {detail}")]
    Gpu { op: &'static str, detail: String },

    /// The CPU backend's thread pool could not be started.
    #[error("could not start a CPU thread pool of {threads} threads: {detail}")]
    ThreadPool { threads: usize, detail: String },
}

impl CodecError {
    /// Whether this error comes from the device rather than from the data: the dispatcher retries such a
    /// failure on the CPU when it chose the GPU by itself.
    pub fn is_device_error(&self) -> bool {
        matches!(self, CodecError::Gpu { .. } | CodecError::GpuUnavailable(_))
    }
}
