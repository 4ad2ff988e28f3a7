//! Checksummed records: the envelope of every value this crate persists.
//!
//! Layout: `[format u8][crc32 u32 LE][payload]`, where the CRC covers `key || payload`.
//!
//! Disks, controllers and kernels do return wrong bytes without reporting an error, and
//! RocksDB's block checksums do not cover everything (memtables, values in flight, bugs that
//! write the wrong value). So every writer wraps values with [`encode_record`] and every reader
//! unwraps with [`decode_record`], which fails with [`StorageError::Corruption`] instead of
//! returning bytes it cannot vouch for. Covering the key as well catches a correct value stored
//! under the wrong key (a misdirected write), which a value-only checksum would accept.
//! The format byte lets the envelope evolve without rewriting existing data.

use crate::engine::Cf;
use crate::error::{Result, StorageError};

/// The only record format so far.
pub const FORMAT_V1: u8 = 1;

/// Bytes of envelope before the payload.
pub const HEADER_LEN: usize = 5;

fn checksum(key: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(key);
    hasher.update(payload);
    hasher.finalize()
}

/// Wraps `payload`, to be stored under `key`.
pub fn encode_record(key: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.push(FORMAT_V1);
    out.extend_from_slice(&checksum(key, payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Verifies a record read from `cf` under `key` and returns its payload.
pub fn decode_record<'a>(cf: Cf, key: &[u8], stored: &'a [u8]) -> Result<&'a [u8]> {
    let Some((header, payload)) = stored.split_first_chunk::<HEADER_LEN>() else {
        return Err(StorageError::corruption(format!(
            "record in {cf} under key {key:?} is {} bytes, shorter than its {HEADER_LEN}-byte header",
            stored.len()
        )));
    };
    let format = header[0];
    if format != FORMAT_V1 {
        return Err(StorageError::corruption(format!(
            "record in {cf} under key {key:?} has unknown format {format}"
        )));
    }
    let stored_crc = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    let actual = checksum(key, payload);
    if stored_crc != actual {
        return Err(StorageError::corruption(format!(
            "record in {cf} under key {key:?} failed its checksum (stored {stored_crc:#010x}, computed {actual:#010x})"
        )));
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_an_empty_payload() {
        let rec = encode_record(b"k", b"");
        assert_eq!(rec.len(), HEADER_LEN);
        assert_eq!(decode_record(Cf::Data, b"k", &rec).unwrap(), b"");
    }

    #[test]
    fn rejects_truncated_records() {
        let rec = encode_record(b"k", b"value");
        for len in 0..rec.len() {
            assert!(
                decode_record(Cf::Data, b"k", &rec[..len]).unwrap_err().is_corruption(),
                "len {len}"
            );
        }
    }

    proptest! {
        #[test]
        fn round_trips(key in proptest::collection::vec(any::<u8>(), 0..32),
                       payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let rec = encode_record(&key, &payload);
            prop_assert_eq!(decode_record(Cf::Meta, &key, &rec).unwrap(), payload.as_slice());
        }

        /// CRC32 detects every single-bit error, so this must hold for every position.
        #[test]
        fn detects_any_flipped_bit(key in proptest::collection::vec(any::<u8>(), 0..32),
                                   payload in proptest::collection::vec(any::<u8>(), 0..256),
                                   pos in any::<prop::sample::Index>(),
                                   bit in 0u8..8) {
            let mut rec = encode_record(&key, &payload);
            let i = pos.index(rec.len());
            rec[i] ^= 1 << bit;
            let err = decode_record(Cf::Data, &key, &rec).unwrap_err();
            prop_assert!(err.is_corruption());
        }

        /// Same-length keys of at most four bytes differ in a burst of at most 32 bits,
        /// which CRC32 always detects; longer keys are protected only probabilistically.
        #[test]
        fn detects_a_record_under_the_wrong_key(key in any::<[u8; 4]>(),
                                                other in any::<[u8; 4]>(),
                                                payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assume!(key != other);
            let rec = encode_record(&key, &payload);
            prop_assert!(decode_record(Cf::Data, &other, &rec).unwrap_err().is_corruption());
        }
    }
}
