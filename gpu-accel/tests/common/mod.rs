//! Helpers shared by the integration tests: input strategies and a fixed batch that exercises every
//! kind of frame (empty, stored, LZ4, a buffer split over several frames).

#![allow(dead_code)] // each test binary uses a different subset

use proptest::prelude::*;

/// One buffer: empty, incompressible, one byte repeated, or a short pattern repeated.
pub fn buffer() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        prop::collection::vec(any::<u8>(), 0..3000),
        (1usize..40_000, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
        (prop::collection::vec(any::<u8>(), 1..16), 1usize..3000).prop_map(|(pattern, n)| pattern.repeat(n)),
    ]
}

/// A batch of 0 to 7 buffers.
pub fn batch() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(buffer(), 0..8)
}

pub fn refs(bufs: &[Vec<u8>]) -> Vec<&[u8]> {
    bufs.iter().map(Vec::as_slice).collect()
}

/// Deterministic pseudo-random bytes (xorshift), incompressible for LZ4.
pub fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// A small batch with an empty buffer, a stored (incompressible) one, LZ4 ones, and text.
pub fn mixed_buffers() -> Vec<Vec<u8>> {
    vec![
        b"the quick brown fox jumps over the lazy dog, the quick brown fox jumps again".to_vec(),
        Vec::new(),
        noise(100, 7),
        vec![0u8; 300],
        b"0123456789".repeat(30),
        b"x".to_vec(),
    ]
}
