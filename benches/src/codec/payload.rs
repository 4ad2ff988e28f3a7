//! The payload `basalt-bench codec` measures: batches of real AppendEntries messages.
//!
//! Each buffer is exactly what a Basalt leader hands the replication codec for one follower: the
//! postcard bytes of the consensus layer's own `AppendOut` (openraft's `AppendEntriesRequest` of
//! `TypeConfig` entries, plus the leader's closed timestamp), whose entries carry
//! `basalt_storage::WriteRequest`s. The types are the server's, not look-alikes, so a change to
//! the wire encoding changes what is measured instead of drifting away from it.
//!
//! Shape: one leader at a fixed term, consecutive log indexes, 64 clients with sessions, each entry
//! a `Put` of a `user/NNNNNN` key with a value of [`VALUE_MIN`]..=[`VALUE_MAX`] bytes whose content
//! follows the [`PayloadKind`].
//!
//! Invariants, and why:
//! - **A buffer is exactly its target size** (one byte less in the rare case where no value length
//!   fills it, more when the target cannot hold a single entry), so the batch sizes in the report are
//!   the sizes measured. The last entry's value is sized from the encoded sizes of everything
//!   before it; a debug assertion checks the arithmetic against the real encoding.
//! - **Deterministic for a seed**: the same arguments give the same bytes, so runs compare.

use std::fmt::Write as _;
use std::ops::Range;

use basalt_consensus::raft::closed_time::Closed;
use basalt_consensus::raft::network::AppendOut;
use basalt_consensus::raft::types::{Entry, LogId, TypeConfig, Vote};
use basalt_storage::{Command, Session, WriteRequest};
use openraft::raft::AppendEntriesRequest;
use openraft::vote::RaftLeaderId;
use openraft::EntryPayload;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

use super::{CodecBenchError, PayloadKind, MIN_BUFFER, VALUE_MAX, VALUE_MIN};

/// A generated batch: its buffers back to back in one allocation, and where each one lies.
#[derive(Clone, Debug, Default)]
pub struct ReplicationBatch {
    pub data: Vec<u8>,
    pub ranges: Vec<Range<usize>>,
    /// Log entries in all the messages.
    pub entries: u64,
}

impl ReplicationBatch {
    /// The buffers, as the codec takes them.
    pub fn bufs(&self) -> Vec<&[u8]> {
        self.ranges.iter().map(|r| &self.data[r.clone()]).collect()
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// A batch of about `total` bytes of AppendEntries messages of `buffer` bytes each (the last one
/// takes the remainder; a remainder under [`MIN_BUFFER`] is added to the message before it), values
/// of `kind`. Deterministic for a given seed.
pub fn generate_batch(
    kind: PayloadKind,
    total: usize,
    buffer: usize,
    seed: u64,
) -> Result<ReplicationBatch, CodecBenchError> {
    let buffer = buffer.max(1);
    let mut targets = vec![buffer; total / buffer];
    let rest = total % buffer;
    match targets.last_mut() {
        Some(last) if rest < MIN_BUFFER as usize => *last += rest,
        _ if rest > 0 => targets.push(rest),
        _ => {}
    }
    let mut gen = MessageGen::new(kind, seed);
    let mut batch = ReplicationBatch {
        data: Vec::with_capacity(total),
        ranges: Vec::with_capacity(targets.len()),
        entries: 0,
    };
    for target in targets {
        let start = batch.data.len();
        batch.entries += gen.message(target, &mut batch.data)?;
        batch.ranges.push(start..batch.data.len());
    }
    Ok(batch)
}

/// Bytes of a postcard (LEB128) varint.
fn varint_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

/// An entry must leave at least this much room behind it for a last entry that fills the message
/// exactly (an entry without its value takes about 45 bytes).
const MIN_FILLER: usize = 64;
const CLIENTS: usize = 64;
const TERM: u64 = 7;
const LEADER: u64 = 1;
/// Wall time of the first message's closed timestamp (µs since the epoch, late 2026); each later
/// message claims 1 ms more, as a leader sending a batch a millisecond would.
const CLOSED_AT_US: u64 = 1_795_000_000_000_000;
const REPETITIVE_LINE: &[u8] = b"status=ok;region=eu-west-1;retries=0;flags=none;";
const FIRST_NAMES: [&str; 16] = [
    "alice", "bruno", "chen", "dana", "emeka", "fatima", "gus", "hana", "ines", "jonas", "kira", "luca", "mei", "nora",
    "omar", "priya",
];
const LAST_NAMES: [&str; 12] = [
    "martin", "garcia", "wang", "smith", "okafor", "haddad", "novak", "tanaka", "silva", "muller", "rossi", "kumar",
];
const CITIES: [&str; 10] = [
    "Lyon", "Osaka", "Lagos", "Austin", "Porto", "Leipzig", "Pune", "Quito", "Perth", "Tromso",
];
/// The words of a text record's free-text note.
const WORDS: &str =
    "order shipped delayed customer requested refund because the package arrived damaged and support replied \
    within two days with a new tracking number please update address billing invoice paid \
    pending review account premium renewal next month discount applied to cart items returned warehouse \
    north priority standard express note ok";

/// What one value is made of (a mixed payload picks one per entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ValueKind {
    Random,
    Text,
    Repetitive,
}

/// Generates the messages: one leader, a growing log index, [`CLIENTS`] clients with sessions.
struct MessageGen {
    rng: SmallRng,
    kind: PayloadKind,
    next_index: u64,
    messages: u64,
    /// Each client's id and the sequence number of its last write.
    clients: [(u64, u64); CLIENTS],
    words: Vec<&'static str>,
}

fn log_id(index: u64) -> LogId {
    let leader = openraft::alias::LeaderIdOf::<TypeConfig>::new(TERM, LEADER);
    LogId::new(leader.to_committed(), index)
}

fn value_of(entry: &mut Entry) -> &mut Vec<u8> {
    match &mut entry.payload {
        EntryPayload::Normal(WriteRequest {
            command: Command::Put { value, .. },
            ..
        }) => value,
        // `next_entry` builds nothing else.
        _ => unreachable!("generated entries are puts"),
    }
}

impl MessageGen {
    fn new(kind: PayloadKind, seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let clients = std::array::from_fn(|_| (rng.random::<u64>(), 0));
        MessageGen {
            rng,
            kind,
            next_index: 1_000_000,
            messages: 0,
            clients,
            words: WORDS.split_whitespace().collect(),
        }
    }

    /// Appends one message of exactly `target` bytes to `out` (see the module's invariants) and
    /// returns its number of entries.
    fn message(&mut self, target: usize, out: &mut Vec<u8>) -> Result<u64, postcard::Error> {
        let prev = log_id(self.next_index - 1);
        let mut rpc = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(TERM, LEADER),
            prev_log_id: Some(prev),
            entries: Vec::new(),
            // The leader's commit index: everything it sent before this message.
            leader_commit: Some(prev),
        };
        let closed = Some(Closed {
            at_us: CLOSED_AT_US + self.messages * 1_000,
            index: prev.index,
        });
        self.messages += 1;
        // The message without its entries, less the one byte of its (zero) entry count.
        let fixed = postcard::experimental::serialized_size(&AppendOut { rpc: &rpc, closed })? - 1;
        let mut body = 0;
        loop {
            let mut entry = self.next_entry();
            // Everything but the value's bytes and its length (one byte while it is empty).
            let bare = postcard::experimental::serialized_size(&entry)? - 1;
            let count = rpc.entries.len() as u64;
            let room = target.saturating_sub(fixed + body + varint_len(count + 2));
            let natural = self.rng.random_range(VALUE_MIN..=VALUE_MAX);
            let size = bare + varint_len(natural as u64) + natural;
            if size + MIN_FILLER <= room {
                self.fill(value_of(&mut entry), natural);
                body += size;
                self.push(&mut rpc, entry);
                continue;
            }
            // The last entry: its value fills the message to `target` exactly, when some length does.
            let room = target.saturating_sub(fixed + body + varint_len(count + 1));
            let fill = (0..=1).find_map(|short| {
                let want = room.checked_sub(bare + short)?;
                (1..=3).find_map(|width| want.checked_sub(width).filter(|&v| varint_len(v as u64) == width))
            });
            if let Some(len) = fill {
                self.fill(value_of(&mut entry), len);
                self.push(&mut rpc, entry);
            }
            break;
        }
        let start = out.len();
        *out = postcard::to_extend(&AppendOut { rpc: &rpc, closed }, std::mem::take(out))?;
        debug_assert!(
            out.len() - start == target || out.len() - start + 1 == target || rpc.entries.len() <= 1,
            "a {target}-byte message came out at {} bytes",
            out.len() - start
        );
        Ok(rpc.entries.len() as u64)
    }

    /// The next entry, with an empty value: a put by a random client, in its session.
    fn next_entry(&mut self) -> Entry {
        let (client_id, sequence) = self.clients[self.rng.random_range(0..CLIENTS)];
        let key = format!("user/{:06}", self.rng.random_range(0..1_000_000u32)).into_bytes();
        Entry {
            log_id: log_id(self.next_index),
            payload: EntryPayload::Normal(WriteRequest {
                session: Some(Session {
                    client_id,
                    sequence: sequence + 1,
                    acked_through: sequence.saturating_sub(self.rng.random_range(0..4)),
                }),
                command: Command::Put { key, value: Vec::new() },
            }),
        }
    }

    /// Adds `entry` to the message and advances the log index and its client's sequence number.
    fn push(&mut self, rpc: &mut AppendEntriesRequest<TypeConfig>, entry: Entry) {
        if let EntryPayload::Normal(WriteRequest {
            session: Some(session), ..
        }) = &entry.payload
        {
            if let Some(client) = self.clients.iter_mut().find(|(id, _)| *id == session.client_id) {
                client.1 = session.sequence;
            }
        }
        rpc.entries.push(entry);
        self.next_index += 1;
    }

    /// Writes a value of exactly `len` bytes of this payload's kind into `value`.
    fn fill(&mut self, value: &mut Vec<u8>, len: usize) {
        let kind = match self.kind {
            PayloadKind::Random => ValueKind::Random,
            PayloadKind::Text => ValueKind::Text,
            PayloadKind::Repetitive => ValueKind::Repetitive,
            PayloadKind::Mixed => {
                [ValueKind::Random, ValueKind::Text, ValueKind::Repetitive][self.rng.random_range(0..3)]
            }
        };
        value.clear();
        match kind {
            ValueKind::Random => {
                value.resize(len, 0);
                self.rng.fill_bytes(value);
            }
            ValueKind::Text => self.text_value(value, len),
            ValueKind::Repetitive => value.extend(REPETITIVE_LINE.iter().copied().cycle().take(len)),
        }
        debug_assert_eq!(value.len(), len);
    }

    /// A JSON-like user record of exactly `len` bytes.
    fn text_value(&mut self, value: &mut Vec<u8>, len: usize) {
        let r = &mut self.rng;
        let first = FIRST_NAMES[r.random_range(0..FIRST_NAMES.len())];
        let last = LAST_NAMES[r.random_range(0..LAST_NAMES.len())];
        let mut record = String::with_capacity(len + 16);
        // Writing to a String cannot fail.
        let _ = write!(
            record,
            r#"{{"id":{},"user":"user/{:06}","name":"{first} {last}","email":"{first}.{last}@example.com","city":"{}","score":{}.{},"active":{},"created":"2026-{:02}-{:02}T{:02}:{:02}:{:02}Z","note":""#,
            r.random_range(1..10_000_000u32),
            r.random_range(0..1_000_000u32),
            CITIES[r.random_range(0..CITIES.len())],
            r.random_range(0..100u32),
            r.random_range(0..10u32),
            r.random_bool(0.8),
            r.random_range(1..=12u32),
            r.random_range(1..=28u32),
            r.random_range(0..24u32),
            r.random_range(0..60u32),
            r.random_range(0..60u32),
        );
        while record.len() < len {
            record.push_str(self.words[self.rng.random_range(0..self.words.len())]);
            record.push(' ');
        }
        value.extend_from_slice(&record.as_bytes()[..len]);
        if len >= 2 {
            value[len - 2..].copy_from_slice(b"\"}");
        }
    }
}

#[cfg(test)]
mod tests {
    use basalt_consensus::raft::network::AppendIn;

    use super::*;

    #[test]
    fn buffers_are_append_entries_as_the_transport_decodes_them_and_of_exactly_the_buffer_size() {
        for kind in PayloadKind::ALL {
            let batch = generate_batch(kind, 256 * 1024 + 3000, 64 * 1024, 1).unwrap();
            assert_eq!(batch.ranges.len(), 5, "{kind:?}: 4 full buffers and the remainder");
            let mut entries = 0;
            let mut index = None;
            for (i, buf) in batch.bufs().into_iter().enumerate() {
                let want = if i < 4 { 64 * 1024 } else { 3000 };
                assert!(
                    buf.len() == want || buf.len() + 1 == want,
                    "{kind:?}: buffer {i} is {} bytes",
                    buf.len()
                );
                // The receiving side's own type and decoder: the bytes are a real AppendEntries.
                let msg: AppendIn = postcard::from_bytes(buf).unwrap();
                assert_eq!(
                    postcard::to_stdvec(&AppendOut {
                        rpc: &msg.rpc,
                        closed: msg.closed
                    })
                    .unwrap(),
                    buf,
                    "re-encodes to the same bytes"
                );
                let rpc = &msg.rpc;
                assert_eq!(rpc.prev_log_id.map(|l| l.index + 1), Some(rpc.entries[0].log_id.index));
                assert_eq!(msg.closed.map(|c| c.index), rpc.prev_log_id.map(|l| l.index));
                for e in &rpc.entries {
                    if let Some(prev) = index {
                        assert_eq!(e.log_id.index, prev + 1, "consecutive log indexes");
                    }
                    index = Some(e.log_id.index);
                    let EntryPayload::Normal(WriteRequest {
                        command: Command::Put { key, value },
                        session: Some(_),
                    }) = &e.payload
                    else {
                        panic!("not a put in a session: {:?}", e.payload)
                    };
                    assert!(key.starts_with(b"user/") && key.len() == 11, "{key:?}");
                    assert!(value.len() <= VALUE_MAX);
                    if kind == PayloadKind::Text && value.len() > 10 {
                        assert!(value.starts_with(b"{\"id\":") && value.ends_with(b"\"}"));
                    }
                }
                entries += rpc.entries.len() as u64;
            }
            assert_eq!(entries, batch.entries);
            assert!(batch.entries > 4 * 64 * 1024 / (VALUE_MAX as u64 + 64), "{kind:?}");
        }
        let a = generate_batch(PayloadKind::Mixed, 100_000, 64 * 1024, 9).unwrap();
        let b = generate_batch(PayloadKind::Mixed, 100_000, 64 * 1024, 9).unwrap();
        assert_eq!(a.data, b.data, "deterministic for a seed");
        let small = generate_batch(PayloadKind::Text, 4096, 64 * 1024, 9).unwrap();
        assert_eq!(small.ranges.len(), 1);
        assert!((4095..=4096).contains(&small.len()));
    }

    #[test]
    fn sessions_advance_per_client() {
        let batch = generate_batch(PayloadKind::Repetitive, 64 * 1024, 64 * 1024, 4).unwrap();
        let msg: AppendIn = postcard::from_bytes(batch.bufs()[0]).unwrap();
        let mut last = std::collections::HashMap::new();
        for e in &msg.rpc.entries {
            let EntryPayload::Normal(WriteRequest { session: Some(s), .. }) = &e.payload else {
                panic!("an entry without a session")
            };
            let prev = last.insert(s.client_id, s.sequence).unwrap_or(0);
            assert_eq!(
                s.sequence,
                prev + 1,
                "client {} numbers its writes in order",
                s.client_id
            );
            assert!(s.acked_through < s.sequence);
        }
    }
}
