//! The encoding of user keys into the node-wide key space, shared by servers and clients.
//!
//! Every stored key is `keyspace id (u32 BE) | shard prefix | encode_bytes(user key)`, and a shard
//! is a contiguous range `[start, end)` of such encoded keys. Servers use the encoding to store
//! and to check that a key belongs to a shard; clients use it to find, in their routing cache,
//! the shard that holds a key, so both must compute it identically: it lives here, in the crate
//! that is the contract.
//!
//! Invariants:
//! - **Order**: byte order of encoded keys equals the order of `(keyspace, prefix, user key)`;
//!   [`encode_bytes`] is a memcomparable escape, so a suffix (an MVCC version) can follow later.
//! - **Range shards** have an empty prefix, so a range keyspace's shards partition user keys in
//!   order and a scan across shard boundaries returns keys in order.
//! - **Hash shards** have a [`HASH_PREFIX_LEN`]-byte prefix, [`hash_of`] the user key, big-endian:
//!   a hash shard is a contiguous range of hash values, and split, merge, snapshot and move work on
//!   both kinds identically. The hash is FNV-1a (64 bits) followed by the MurmurHash3 64-bit
//!   finaliser, keeping the top 16 bits: a few lines in any language, and well mixed even for
//!   sequential keys (FNV alone leaves the high bits poorly mixed for short keys).

/// The keyspace that holds the cluster catalog (served by the meta group).
pub const SYSTEM_KEYSPACE: u32 = 0;

/// The keyspace that every cluster has, named [`DEFAULT_KEYSPACE_NAME`].
pub const DEFAULT_KEYSPACE: u32 = 1;

pub const DEFAULT_KEYSPACE_NAME: &str = "default";

/// The largest valid keyspace id. `u32::MAX` is reserved so that every keyspace has an
/// exclusive upper bound (`keyspace + 1`) inside the 4-byte prefix space.
pub const MAX_KEYSPACE: u32 = u32::MAX - 1;

/// Width of a hash keyspace's shard prefix.
pub const HASH_PREFIX_LEN: usize = 2;

/// Number of distinct hash values (the hash space of a hash keyspace).
pub const HASH_SPACE: u32 = 1 << 16;

const ESCAPE: u8 = 0x00;
const ESCAPED_ZERO: u8 = 0xFF;
const TERMINATOR: u8 = 0x01;

/// An encoded key that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeyDecodeError(pub String);

/// Appends the memcomparable encoding of `b`: every `0x00` becomes `0x00 0xFF` and the string
/// ends with `0x00 0x01`. The terminator sorts below every escaped or ordinary continuation
/// byte, so a string sorts before each of its extensions, exactly as raw bytes do.
pub fn encode_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.reserve(b.len() + 2);
    for &byte in b {
        if byte == ESCAPE {
            out.extend_from_slice(&[ESCAPE, ESCAPED_ZERO]);
        } else {
            out.push(byte);
        }
    }
    out.extend_from_slice(&[ESCAPE, TERMINATOR]);
}

/// Decodes one [`encode_bytes`] string from the front of `input`; returns it and the number of
/// bytes consumed, so that a suffix may follow.
pub fn decode_bytes(input: &[u8]) -> Result<(Vec<u8>, usize), KeyDecodeError> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let byte = input[i];
        if byte != ESCAPE {
            out.push(byte);
            i += 1;
            continue;
        }
        match input.get(i + 1) {
            Some(&ESCAPED_ZERO) => {
                out.push(0);
                i += 2;
            }
            Some(&TERMINATOR) => return Ok((out, i + 2)),
            Some(other) => {
                return Err(KeyDecodeError(format!(
                    "encoded byte string has invalid escape 0x00 0x{other:02x} at offset {i}"
                )))
            }
            None => break,
        }
    }
    Err(KeyDecodeError(format!(
        "encoded byte string of {} bytes has no terminator",
        input.len()
    )))
}

/// The 16-bit hash of a user key that places it in a hash keyspace.
pub fn hash_of(user_key: &[u8]) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in user_key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h >> 48) as u16
}

/// The stored key of `user_key` in `keyspace`. `shard_prefix` is empty for range-sharded
/// keyspaces and [`hash_of`] the user key (big-endian) for hash-sharded ones.
pub fn data_key(keyspace: u32, shard_prefix: &[u8], user_key: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(4 + shard_prefix.len() + user_key.len() + 2);
    key.extend_from_slice(&keyspace.to_be_bytes());
    key.extend_from_slice(shard_prefix);
    encode_bytes(&mut key, user_key);
    key
}

/// The stored key of `user_key` in a keyspace sharded by hash (`hashed`) or by range.
pub fn encode_key(keyspace: u32, hashed: bool, user_key: &[u8]) -> Vec<u8> {
    if hashed {
        data_key(keyspace, &hash_of(user_key).to_be_bytes(), user_key)
    } else {
        data_key(keyspace, &[], user_key)
    }
}

/// Recovers the user key from a stored key of `keyspace` whose shard prefix is `prefix_len`
/// bytes long. Anything else (another keyspace, trailing bytes) is an error: the caller read it
/// from inside its own key range.
pub fn decode_data_key(keyspace: u32, prefix_len: usize, key: &[u8]) -> Result<Vec<u8>, KeyDecodeError> {
    let header = 4 + prefix_len;
    if key.len() < header || key[..4] != keyspace.to_be_bytes() {
        return Err(KeyDecodeError(format!(
            "data key {key:?} does not belong to keyspace {keyspace}"
        )));
    }
    let (user_key, used) = decode_bytes(&key[header..])?;
    if header + used != key.len() {
        return Err(KeyDecodeError(format!(
            "data key {key:?} has {} unexpected trailing bytes",
            key.len() - header - used
        )));
    }
    Ok(user_key)
}

/// `[start, end)` of every stored key of `keyspace`.
///
/// # Panics
/// If `keyspace` is `u32::MAX`, which is reserved (see [`MAX_KEYSPACE`]); keyspace ids come
/// from the catalog, which never allocates it.
pub fn keyspace_range(keyspace: u32) -> (Vec<u8>, Vec<u8>) {
    let next = keyspace
        .checked_add(1)
        .expect("keyspace id u32::MAX is reserved so that every keyspace has an upper bound");
    (keyspace.to_be_bytes().to_vec(), next.to_be_bytes().to_vec())
}

/// The start of hash value `h` in `keyspace`; `h == HASH_SPACE` is the keyspace's end.
pub fn hash_bound(keyspace: u32, h: u32) -> Vec<u8> {
    if h >= HASH_SPACE {
        return keyspace_range(keyspace).1;
    }
    let mut key = keyspace.to_be_bytes().to_vec();
    key.extend_from_slice(&(h as u16).to_be_bytes());
    key
}

/// The bounds of the `n` equal hash shards of a new hash keyspace: `n + 1` keys, from the
/// keyspace's start to its end. `n` must lie in `1..=HASH_SPACE`.
pub fn hash_shard_bounds(keyspace: u32, n: u32) -> Vec<Vec<u8>> {
    assert!(
        (1..=HASH_SPACE).contains(&n),
        "hash shard count {n} outside 1..={HASH_SPACE}"
    );
    let mut bounds: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let h = (u64::from(i) * u64::from(HASH_SPACE) / u64::from(n)) as u32;
            if i == 0 {
                keyspace_range(keyspace).0
            } else {
                hash_bound(keyspace, h)
            }
        })
        .collect();
    bounds.push(keyspace_range(keyspace).1);
    bounds
}

/// The stored key at which a scan reads next: the cursor a previous page returned, else the
/// first position of the range (the start key on a range keyspace; the keyspace's first hash
/// value on a hash keyspace, whose keys of any range are spread over every hash value). The
/// shard holding this position serves the request.
pub fn scan_position(keyspace: u32, hashed: bool, cursor: Option<&[u8]>, start: &[u8]) -> Vec<u8> {
    match cursor {
        Some(c) if !c.is_empty() => c.to_vec(),
        _ if hashed => keyspace_range(keyspace).0,
        _ => data_key(keyspace, &[], start),
    }
}

/// A readable form of a shard bound: the user key of a range keyspace (lossy UTF-8, or hex
/// when not text), the hash value of a hash keyspace, `-inf`/`+inf` at the keyspace's edges.
pub fn display_bound(keyspace: u32, hashed: bool, bound: &[u8]) -> String {
    let (start, end) = keyspace_range(keyspace);
    if bound <= start.as_slice() {
        return "-inf".into();
    }
    if bound >= end.as_slice() {
        return "+inf".into();
    }
    let rest = &bound[4..];
    if hashed {
        let mut h = [0u8; 2];
        for (i, b) in rest.iter().take(2).enumerate() {
            h[i] = *b;
        }
        return format!("#{}", u16::from_be_bytes(h));
    }
    match decode_bytes(rest) {
        Ok((k, _)) if std::str::from_utf8(&k).is_ok_and(|s| !s.chars().any(char::is_control)) => {
            String::from_utf8_lossy(&k).into_owned()
        }
        Ok((k, _)) => format!("0x{}", k.iter().map(|b| format!("{b:02x}")).collect::<String>()),
        Err(_) => format!("0x{}", rest.iter().map(|b| format!("{b:02x}")).collect::<String>()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hash_shards_partition_the_keyspace_evenly() {
        let b = hash_shard_bounds(7, 16);
        assert_eq!(b.len(), 17);
        assert_eq!(b[0], keyspace_range(7).0);
        assert_eq!(b[16], keyspace_range(7).1);
        assert_eq!(b[1], hash_bound(7, 4096));
        assert!(b.windows(2).all(|w| w[0] < w[1]));
    }

    /// The balance the issue asks of hash keyspaces, on the hash alone: 100,000 uniformly random
    /// keys over 16 shards, largest at most 1.2x the smallest (in practice about 1.05x).
    #[test]
    fn uniformly_random_keys_spread_evenly_over_hash_shards() {
        let bounds = hash_shard_bounds(3, 16);
        let mut counts = [0u32; 16];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..100_000 {
            // xorshift64*: a fixed, reproducible stream of uniformly random keys.
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let key = format!("user{}", x.wrapping_mul(0x2545_f491_4f6c_dd1d));
            let k = encode_key(3, true, key.as_bytes());
            let shard = bounds.partition_point(|b| b.as_slice() <= k.as_slice()) - 1;
            counts[shard] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(f64::from(*max) <= 1.2 * f64::from(*min), "{counts:?}");
    }

    #[test]
    fn sequential_keys_spread_too() {
        let mut counts = [0u32; 16];
        for i in 0..50_000 {
            counts[(hash_of(format!("key{i:08}").as_bytes()) >> 12) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(f64::from(*max) <= 1.2 * f64::from(*min), "{counts:?}");
    }

    #[test]
    fn bounds_display_readably() {
        assert_eq!(display_bound(1, false, &keyspace_range(1).0), "-inf");
        assert_eq!(display_bound(1, false, &keyspace_range(1).1), "+inf");
        assert_eq!(display_bound(1, false, &data_key(1, &[], b"m")), "m");
        assert_eq!(display_bound(1, true, &hash_bound(1, 4096)), "#4096");
    }

    proptest! {
        #[test]
        fn hashed_keys_sort_by_hash_then_key(a in proptest::collection::vec(any::<u8>(), 0..16),
                                             b in proptest::collection::vec(any::<u8>(), 0..16)) {
            let (ka, kb) = (encode_key(5, true, &a), encode_key(5, true, &b));
            prop_assert_eq!((hash_of(&a), &a).cmp(&(hash_of(&b), &b)), ka.cmp(&kb));
            prop_assert_eq!(decode_data_key(5, HASH_PREFIX_LEN, &ka).unwrap(), a);
            let (s, e) = (hash_bound(5, u32::from(hash_of(&b))), hash_bound(5, u32::from(hash_of(&b)) + 1));
            prop_assert!(s <= kb && kb < e);
        }
    }
}
