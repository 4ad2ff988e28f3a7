//! Encoding of Raft messages for the peer transport and for storage.
//!
//! openraft's messages and entries are serde types; they travel and rest as postcard bytes (compact,
//! no schema to maintain, and the peer protocol is not a public contract). Every peer payload
//! carries a crc32 checked before decoding, so a corrupted message is rejected (the sender
//! retries) rather than misread. A decoding failure on stored data means corruption.

use serde::{de::DeserializeOwned, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("checksum mismatch in {what}: expected {expected:#010x}, got {actual:#010x}")]
    Checksum {
        what: &'static str,
        expected: u32,
        actual: u32,
    },
    #[error("cannot decode {what}: {source}")]
    Decode {
        what: &'static str,
        source: postcard::Error,
    },
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        source: postcard::Error,
    },
}

pub fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, WireError> {
    postcard::to_stdvec(value).map_err(|source| WireError::Encode { what, source })
}

pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, WireError> {
    postcard::from_bytes(bytes).map_err(|source| WireError::Decode { what, source })
}

/// Verifies `crc` over `parts` (concatenated) and reports which message failed.
pub fn verify_crc(what: &'static str, parts: &[&[u8]], expected: u32) -> Result<(), WireError> {
    let actual = crc(parts);
    if actual == expected {
        Ok(())
    } else {
        Err(WireError::Checksum { what, expected, actual })
    }
}

pub fn crc(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

pub fn to_io(e: WireError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flipped_bit_in_payload_is_detected() {
        let payload = encode("t", &(1u64, "hello".to_string())).unwrap();
        let sum = crc(&[&payload]);
        let mut bad = payload.clone();
        bad[2] ^= 0x10;
        assert!(verify_crc("t", &[&payload], sum).is_ok());
        assert!(matches!(verify_crc("t", &[&bad], sum), Err(WireError::Checksum { .. })));
    }
}
