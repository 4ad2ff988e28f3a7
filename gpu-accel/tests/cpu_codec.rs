//! Properties of the CPU backend in every thread configuration: round trips, CRCs equal to
//! `crc32fast`, identical encodings whatever the thread count, and detection of every single-bit flip and
//! every truncation.

mod common;

use basalt_gpu::{Backend, CodecError, CodecId, CpuBackend, BATCH_HEADER_LEN, FRAME_HEADER_LEN};
use common::{batch, mixed_buffers, noise, refs};
use proptest::prelude::*;

/// Every configuration under test. The parallel ones have a threshold of 0 so that even tiny batches take
/// the pool's code path, and small chunks so that buffers are split over several frames.
fn backends() -> Vec<(&'static str, CpuBackend)> {
    let pool = |threads| CpuBackend::with_threads(threads).expect("thread pool starts");
    vec![
        ("one core", CpuBackend::single_threaded()),
        (
            "one core, 1000-byte chunks",
            CpuBackend::single_threaded().with_chunk_len(1000),
        ),
        (
            "4 threads, 1000-byte chunks",
            pool(4)
                .with_parallel_threshold(0)
                .with_checksum_parallel_threshold(0)
                .with_chunk_len(1000),
        ),
        (
            "all cores",
            CpuBackend::all_cores()
                .expect("thread pool starts")
                .with_parallel_threshold(0)
                .with_checksum_parallel_threshold(0),
        ),
    ]
}

fn encode(backend: &CpuBackend, bufs: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    let n = backend
        .encode_batch(&refs(bufs), &mut out)
        .expect("encoding cannot fail for these sizes");
    assert_eq!(n, out.len());
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn round_trip_on_every_configuration(bufs in batch()) {
        let backends = backends();
        let encoded: Vec<Vec<u8>> = backends.iter().map(|(_, b)| encode(b, &bufs)).collect();
        for ((name, _), wire) in backends.iter().zip(&encoded) {
            // Any backend decodes what any other encoded.
            for (decoder_name, decoder) in &backends {
                let decoded = decoder.decode_batch(wire).map_err(|e| TestCaseError::fail(format!("{name} -> {decoder_name}: {e}")))?;
                prop_assert_eq!(decoded.to_vecs(), bufs.clone(), "{} -> {}", name, decoder_name);
            }
        }
        // The thread count never changes the bytes, only the chunk length does.
        prop_assert_eq!(&encoded[1], &encoded[2]);
        prop_assert_eq!(&encoded[0], &encoded[3]);
    }

    #[test]
    fn checksums_equal_crc32fast(bufs in batch()) {
        let expected: Vec<u32> = bufs.iter().map(|b| crc32fast::hash(b)).collect();
        for (name, backend) in backends() {
            prop_assert_eq!(backend.checksum_batch(&refs(&bufs)).expect("infallible on the CPU"), expected.clone(), "{}", name);
        }
    }

    #[test]
    fn any_single_bit_flip_is_an_error(bufs in batch(), bit in any::<prop::sample::Index>()) {
        for (name, backend) in backends() {
            let mut wire = encode(&backend, &bufs);
            let bit = bit.index(wire.len() * 8);
            wire[bit / 8] ^= 1 << (bit % 8);
            let mut out = vec![1, 2, 3];
            let result = backend.decode_batch_into(&wire, &mut out);
            prop_assert!(result.is_err(), "{}: flipping bit {} went unnoticed", name, bit);
            prop_assert_eq!(&out, &[1, 2, 3], "a failed decode must not leave data behind");
        }
    }

    #[test]
    fn any_truncation_is_an_error(bufs in batch(), cut in any::<prop::sample::Index>()) {
        for (name, backend) in backends() {
            let wire = encode(&backend, &bufs);
            let cut = cut.index(wire.len());
            prop_assert!(backend.decode_batch(&wire[..cut]).is_err(), "{}: cut at {} of {} went unnoticed", name, cut, wire.len());
        }
    }

    #[test]
    fn arbitrary_input_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let backend = CpuBackend::single_threaded();
        prop_assert!(backend.decode_batch(&bytes).is_err());
        let _ = backend.decode_frames(&bytes);
    }

    /// A sender that computes every checksum right but sends garbage LZ4 (a bug, or malice) gets an error
    /// or its exact declared bytes back, never a panic or an oversized allocation.
    #[test]
    fn garbage_lz4_with_valid_checksums_never_panics(payload in prop::collection::vec(any::<u8>(), 1..300), ratio in 2u32..255) {
        let header = basalt_gpu::frame::FrameHeader {
            codec: CodecId::Lz4Block,
            continues: false,
            raw_len: payload.len() as u32 * ratio,
            payload_len: payload.len() as u32,
            raw_crc: 0x1234_5678,
            payload_crc: crc32fast::hash(&payload),
        };
        let mut frames = header.to_bytes().to_vec();
        frames.extend_from_slice(&payload);
        match CpuBackend::single_threaded().decode_frames(&frames) {
            Ok(decoded) => prop_assert_eq!(crc32fast::hash(decoded.data()), 0x1234_5678),
            Err(e) => prop_assert!(matches!(e, CodecError::Decompress { .. } | CodecError::LengthMismatch { .. } | CodecError::DataChecksum { .. }), "{e}"),
        }
    }
}

/// Exhaustive over one small batch with every kind of frame: every bit of it, every cut, every appended byte.
#[test]
fn every_bit_flip_and_every_cut_of_a_mixed_batch_is_an_error() {
    let bufs = mixed_buffers();
    for (name, backend) in backends() {
        let wire = encode(&backend, &bufs);
        assert_eq!(
            backend.decode_batch(&wire).expect("intact batch decodes").to_vecs(),
            bufs,
            "{name}"
        );
        for bit in 0..wire.len() * 8 {
            let mut corrupt = wire.clone();
            corrupt[bit / 8] ^= 1 << (bit % 8);
            assert!(
                backend.decode_batch(&corrupt).is_err(),
                "{name}: bit {bit} flipped unnoticed"
            );
        }
        for cut in 0..wire.len() {
            assert!(
                backend.decode_batch(&wire[..cut]).is_err(),
                "{name}: cut at {cut} unnoticed"
            );
        }
        let mut longer = wire.clone();
        longer.push(0);
        assert!(
            matches!(backend.decode_batch(&longer), Err(CodecError::TrailingBytes { .. })),
            "{name}"
        );
    }
}

#[test]
fn mixed_batch_uses_both_codecs() {
    let wire = encode(&CpuBackend::single_threaded(), &mixed_buffers());
    let mut codecs = Vec::new();
    let mut pos = BATCH_HEADER_LEN;
    while pos < wire.len() {
        let header = basalt_gpu::frame::FrameHeader::parse(&wire[pos..], codecs.len(), pos).expect("valid frame");
        codecs.push(header.codec);
        pos += header.frame_len();
    }
    assert!(
        codecs.contains(&CodecId::Stored) && codecs.contains(&CodecId::Lz4Block),
        "{codecs:?}"
    );
}

#[test]
fn a_large_buffer_is_split_into_frames_and_joined_back() {
    let mut big = noise(1 << 20, 3);
    big.extend(std::iter::repeat_n(9u8, 2 << 20));
    big.extend(noise(12345, 4));
    let bufs = vec![big, b"tail".to_vec()];
    let one = CpuBackend::single_threaded();
    let all = CpuBackend::all_cores().expect("thread pool starts");
    let wire = encode(&one, &bufs);
    assert_eq!(wire, encode(&all, &bufs), "thread count must not change the encoding");
    // 1 MiB noise + 2 MiB run + 12345 bytes = 4 frames of at most 1 MiB, then the tail.
    assert_eq!(u32::from_le_bytes(wire[4..8].try_into().expect("4 bytes")), 5);
    assert!(
        wire.len() < (1 << 20) + 12345 + 10_000,
        "the run of 9s must compress: {} bytes",
        wire.len()
    );
    assert_eq!(all.decode_batch(&wire).expect("decodes").to_vecs(), bufs);
    let crcs = all.checksum_batch(&refs(&bufs)).expect("infallible");
    assert_eq!(crcs, vec![crc32fast::hash(&bufs[0]), crc32fast::hash(b"tail")]);
}

#[test]
fn empty_batch_and_empty_buffers() {
    let backend = CpuBackend::single_threaded();
    let wire = encode(&backend, &[]);
    assert_eq!(wire.len(), BATCH_HEADER_LEN);
    assert!(backend.decode_batch(&wire).expect("decodes").is_empty());
    let wire = encode(&backend, &[vec![], vec![]]);
    assert_eq!(wire.len(), BATCH_HEADER_LEN + 2 * FRAME_HEADER_LEN);
    assert_eq!(
        backend.decode_batch(&wire).expect("decodes").to_vecs(),
        vec![Vec::<u8>::new(), Vec::new()]
    );
    assert_eq!(backend.checksum_batch(&[]).expect("infallible"), Vec::<u32>::new());
}

#[test]
fn decode_into_appends_after_existing_bytes() {
    let backend = CpuBackend::single_threaded();
    let bufs = mixed_buffers();
    let wire = encode(&backend, &bufs);
    let mut out = b"prefix".to_vec();
    let ranges = backend.decode_batch_into(&wire, &mut out).expect("decodes");
    assert_eq!(&out[..6], b"prefix");
    let got: Vec<Vec<u8>> = ranges.into_iter().map(|r| out[r].to_vec()).collect();
    assert_eq!(got, bufs);
}

#[test]
fn concatenated_frames_decode_and_cuts_inside_a_frame_are_errors() {
    let backend = CpuBackend::single_threaded().with_chunk_len(64);
    let first = mixed_buffers();
    let second = vec![b"later".to_vec(), vec![5u8; 1000]];
    let mut stream = Vec::new();
    backend.encode_frames_into(&refs(&first), &mut stream);
    let boundary = stream.len();
    backend.encode_frames_into(&refs(&second), &mut stream);

    let mut expected = first.clone();
    expected.extend(second);
    assert_eq!(backend.decode_frames(&stream).expect("decodes").to_vecs(), expected);
    // A cut at the boundary between the two appends is, by design, a shorter valid stream.
    assert_eq!(
        backend.decode_frames(&stream[..boundary]).expect("decodes").to_vecs(),
        first
    );
    // Cuts inside a frame, and cuts between two frames of one split buffer, are errors.
    let mut frame_starts = vec![];
    let mut pos = 0;
    while pos < stream.len() {
        let h = basalt_gpu::frame::FrameHeader::parse(&stream[pos..], 0, pos).expect("valid frame");
        frame_starts.push((pos, h.continues));
        pos += h.frame_len();
    }
    for cut in 1..stream.len() {
        let at_buffer_end = frame_starts.iter().any(|&(p, _)| p == cut)
            && frame_starts
                .iter()
                .rev()
                .find(|&&(p, _)| p < cut)
                .is_some_and(|&(_, continues)| !continues);
        assert_eq!(
            backend.decode_frames(&stream[..cut]).is_ok(),
            at_buffer_end,
            "cut at {cut}"
        );
    }
}
