//! `basaltctl scan`: key ranges from the command line, and paging through them.
//!
//! The library returns at most one server page per call when no limit is given, so the command
//! pages: each next call continues from the previous page's cursor with the same range, which
//! neither skips nor repeats a key in either kind of keyspace (restarting after the last key
//! would be wrong in a hash-sharded one, whose pages are in hash order). Only a server that
//! predates cursors is continued at the successor of the last key (that key followed by a zero
//! byte, the smallest key greater than it); it holds a single range-ordered keyspace, where that
//! is the same thing. Paging stops when the server says there is no more, or when `--limit` pairs
//! have been printed. A page that claims "more" but has neither pairs nor a cursor would make
//! paging loop forever, so it is reported as a protocol violation instead.

use bytes::Bytes;

use crate::cli::args::ScanArgs;
use crate::cli::exit::CliError;
use crate::client::{key_successor, Client};
use crate::read_mode::{older, ServedRead};

/// A half-open key range `[start, end)`; `end: None` is unbounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    pub start: Bytes,
    pub end: Option<Bytes>,
}

impl KeyRange {
    /// The range a `scan` command line names: `--prefix P`, or `[START [END]]`.
    pub fn from_args(args: &ScanArgs) -> Self {
        match &args.prefix {
            Some(prefix) => {
                let prefix = prefix.as_bytes();
                KeyRange {
                    start: Bytes::copy_from_slice(prefix),
                    end: prefix_successor(prefix).map(Bytes::from),
                }
            }
            None => KeyRange {
                start: args
                    .start
                    .as_deref()
                    .map(|s| Bytes::copy_from_slice(s.as_bytes()))
                    .unwrap_or_default(),
                end: args.end.as_deref().map(|s| Bytes::copy_from_slice(s.as_bytes())),
            },
        }
    }
}

/// The smallest key greater than every key that starts with `prefix`: drop trailing 0xff bytes
/// (no key with that prefix can be bounded by incrementing them) and increment the last byte.
/// `None` when there is no such key (empty prefix, or all 0xff), i.e. the range is unbounded.
pub fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let keep = prefix.iter().rposition(|&b| b != 0xff)?;
    let mut end = prefix[..=keep].to_vec();
    end[keep] += 1;
    Some(end)
}

/// Every pair in `range`, at most `limit` of them (`None` = all), in the keyspace's order.
pub async fn collect(client: &Client, range: KeyRange, limit: Option<u32>) -> Result<Scanned, CliError> {
    let mut out: Vec<(Bytes, Bytes)> = Vec::new();
    let mut served = None;
    let mut start = range.start;
    let mut cursor: Option<Bytes> = None;
    loop {
        let page_limit = match limit {
            // Positive and at most `limit`: the loop stops once `limit` pairs are collected.
            Some(limit) => u32::try_from(limit as usize - out.len()).unwrap_or(limit),
            None => 0,
        };
        let page = client
            .scan_from_cursor(start.clone(), range.end.clone(), page_limit, cursor.take())
            .await?;
        let last = page.kvs.last().map(|(k, _)| k.clone());
        out.extend(page.kvs);
        if let Some(s) = page.served {
            served = Some(older(served, s));
        }
        if let Some(limit) = limit {
            out.truncate(limit as usize);
            if out.len() >= limit as usize {
                break;
            }
        }
        if !page.more {
            break;
        }
        match (page.cursor, last) {
            (Some(next), _) => cursor = Some(next),
            (None, Some(last)) => start = key_successor(&last),
            (None, None) => {
                return Err(CliError::Protocol(
                    "scan page is empty and has no cursor but claims more pairs follow".into(),
                ))
            }
        }
    }
    Ok(Scanned { kvs: out, served })
}

/// What a scan command read, and how (the page whose answer may be the oldest).
pub struct Scanned {
    pub kvs: Vec<(Bytes, Bytes)>,
    pub served: Option<ServedRead>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn successor_examples() {
        assert_eq!(prefix_successor(b"abc"), Some(b"abd".to_vec()));
        assert_eq!(prefix_successor(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_successor(b"a\xff\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_successor(b"\xff\xff"), None);
        assert_eq!(prefix_successor(b""), None);
        assert_eq!(key_successor(b"k"), Bytes::from_static(b"k\0"));
    }

    #[test]
    fn ranges_from_arguments() {
        let args = |start: Option<&str>, end: Option<&str>, prefix: Option<&str>| ScanArgs {
            start: start.map(Into::into),
            end: end.map(Into::into),
            prefix: prefix.map(Into::into),
            limit: None,
        };
        assert_eq!(
            KeyRange::from_args(&args(None, None, Some("user/"))),
            KeyRange {
                start: Bytes::from_static(b"user/"),
                end: Some(Bytes::from_static(b"user0"))
            }
        );
        assert_eq!(
            KeyRange::from_args(&args(Some("a"), Some("m"), None)),
            KeyRange {
                start: Bytes::from_static(b"a"),
                end: Some(Bytes::from_static(b"m"))
            }
        );
        assert_eq!(
            KeyRange::from_args(&args(None, None, None)),
            KeyRange {
                start: Bytes::new(),
                end: None
            }
        );
    }

    proptest! {
        /// Every key with the prefix sorts below the successor, and the prefix itself is the
        /// smallest such key; keys without the prefix that sort at or above the prefix also
        /// sort at or above the successor.
        #[test]
        fn prefix_range_is_exact(prefix in prop::collection::vec(any::<u8>(), 0..6),
                                 key in prop::collection::vec(any::<u8>(), 0..8)) {
            let in_range = key.as_slice() >= prefix.as_slice()
                && prefix_successor(&prefix).is_none_or(|end| key.as_slice() < end.as_slice());
            prop_assert_eq!(in_range, key.starts_with(&prefix));
        }
    }
}
