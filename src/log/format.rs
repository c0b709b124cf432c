//! The on-disk format of the durable-queue log, as plain functions over byte slices.
//!
//! This module owns every byte layout written by the log (segment header, record framing, the
//! three record kinds) and the scanner that walks a segment's bytes. It knows no files, maps or
//! clocks, so the writer, recovery and the `stompd-log` inspection tool share one
//! implementation and the fuzz/property tests reach all of it. `docs/log-format.md` is the
//! normative description; a change here must bump [`FORMAT_VERSION`] and update that file.
//!
//! Invariants: integers are fixed-width little-endian; every record starts on an 8-byte
//! boundary; a record's CRC covers the segment sequence number, its 16 framing bytes, the header
//! part and the body, so a record copied into another segment (or left over from an earlier use
//! of the file) never validates; a zero header length ends the data of a segment (segments are
//! preallocated with zeros, and no valid record has an empty header part); from version 2 on,
//! every append also writes an end marker (16 zero bytes of framing) right after its record, so
//! the data of a recycled segment (one whose file held an earlier segment, marked
//! [`SEGMENT_FLAG_RECYCLED`]) ends exactly there and the leftovers behind it are never read.
//!
//! Record layouts follow the segment's format version: a message record in a version 1 or 2
//! segment stores its id as text and its headers as unescaped entries; from version 3 on it
//! stores the broker's binary id and the header block exactly as the broker holds it (STOMP 1.2
//! escapes), so appending and reading back copy bytes and never escape or unescape. A segment
//! holds records of its own version only: the writer never appends to an older segment.

use std::borrow::Cow;
use std::fmt;

use crate::codec::escape::{escape_into, unescape};
use crate::codec::{Escaping, Header};

/// The first eight bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"STOMPDLG";
/// The format version this build writes. Readers accept every version from
/// [`FORMAT_VERSION_MIN`] up to this one, as listed in `docs/log-format.md`.
pub const FORMAT_VERSION: u32 = 3;
/// The oldest format version this build still reads (and appends to, in its own format).
pub const FORMAT_VERSION_MIN: u32 = 1;
/// Segment header flag (version 2 on): the file held an earlier segment before this one, so
/// bytes after the end of this segment's data are leftovers. The data then ends at the first
/// end marker (H = 0, B = 0), and nothing after it is examined.
pub const SEGMENT_FLAG_RECYCLED: u32 = 1;
/// The first format version with recycled segments (and end markers): a reclaimed segment
/// file of this version or later may be reused; a version 1 one never is.
pub const FORMAT_VERSION_RECYCLING: u32 = 2;
/// The first format version whose message records carry a binary id and the header block as
/// the broker holds it (see [`MessageRecord`]).
pub const FORMAT_VERSION_BLOCK: u32 = 3;
/// Every flag bit a reader of this version knows; a header with another bit set is refused.
const SEGMENT_FLAGS_KNOWN: u32 = SEGMENT_FLAG_RECYCLED;
/// Size of the segment header; records start right after it.
pub const SEGMENT_HEADER_BYTES: usize = 64;
/// The framing before each record: u64 header length, u64 body length.
pub const FRAME_BYTES: usize = 16;
/// The CRC32 after the body.
pub const CRC_BYTES: usize = 4;
/// Records start on multiples of this, so the u64 framing is naturally aligned in the map.
pub const RECORD_ALIGN: usize = 8;

/// Record kind byte: a queued message.
pub const KIND_MESSAGE: u8 = 1;
/// Record kind byte: messages that are done (acknowledged, or discarded by the broker).
pub const KIND_ACK: u8 = 2;
/// Record kind byte: messages handed to a consumer for the first time.
pub const KIND_DELIVERED: u8 = 3;

/// Fixed part of a version 1 or 2 message record's header part: kind, flags, reserved, header
/// count, timestamp, destination length, message id length.
pub const MESSAGE_FIXED_BYTES: usize = 24;
/// Fixed part of a version 3 message record's header part: kind, flags, reserved, header block
/// length, timestamp, destination length, id shard, reserved, id sequence.
pub const MESSAGE_V3_FIXED_BYTES: usize = 32;
/// Message record flag (version 3): a non-persistent message written only to save memory.
/// Recovery treats it as absent (never restored, never live), whatever acks name it.
pub const MESSAGE_FLAG_TRANSIENT: u8 = 1;
/// Message record flag (version 3): no header in the block needed an escape, so the block is
/// valid as is for every STOMP version (`Message::header_block_plain`).
pub const MESSAGE_FLAG_BLOCK_PLAIN: u8 = 2;
/// Every message flag bit version 3 knows; a record with another bit set is damaged.
const MESSAGE_FLAGS_KNOWN: u8 = MESSAGE_FLAG_TRANSIENT | MESSAGE_FLAG_BLOCK_PLAIN;
/// Fixed part of an ack or delivered record's header part: kind, flags, reserved, count.
pub const REFS_FIXED_BYTES: usize = 8;
/// One message reference in an ack or delivered record: segment u64, offset u64.
pub const REF_BYTES: usize = 16;
/// Per stored STOMP header: u32 name length, u32 value length.
pub const HEADER_ENTRY_FIXED_BYTES: usize = 8;

/// Where a record starts: the sequence number of its segment and its byte offset in that file.
/// Positions order like the log: by segment, then by offset. A message's position is its
/// identity in ack and delivered records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    /// Sequence number of the segment (its file name).
    pub segment: u64,
    /// Byte offset of the record's framing inside the segment file.
    pub offset: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.segment, self.offset)
    }
}

/// What is wrong with bytes that should hold a segment header or a record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{needed} bytes needed, {available} available")]
    Truncated { needed: u64, available: u64 },
    #[error("bad magic {found:02x?}")]
    BadMagic { found: [u8; 8] },
    #[error(
        "format version {found} is not supported (this build reads versions {FORMAT_VERSION_MIN} to {FORMAT_VERSION})"
    )]
    UnsupportedVersion { found: u32 },
    #[error("segment header flags {flags:#x} are not known to format version {version}")]
    UnknownFlags { flags: u32, version: u32 },
    #[error("segment header size {found} is not {SEGMENT_HEADER_BYTES}")]
    BadHeaderSize { found: u32 },
    #[error("segment header CRC {stored:#010x} does not match computed {computed:#010x}")]
    HeaderCrc { stored: u32, computed: u32 },
    #[error("record framing is implausible: header length {header_len}, body length {body_len}")]
    BadFraming { header_len: u64, body_len: u64 },
    #[error("record CRC {stored:#010x} does not match computed {computed:#010x}")]
    RecordCrc { stored: u32, computed: u32 },
    #[error("unknown record kind {kind}")]
    UnknownKind { kind: u8 },
    #[error("{field} is malformed at byte {offset} of the header part")]
    BadField { field: &'static str, offset: usize },
}

/// The header at the start of every segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Format version the segment was written with.
    pub format_version: u32,
    /// The shard (core) that owns this log.
    pub shard: u32,
    /// Sequence number of the segment, also its file name.
    pub sequence: u64,
    /// Length of the segment file, fixed at creation.
    pub segment_bytes: u64,
    /// Creation time in Unix milliseconds, as given by the caller; informational.
    pub created_ms: u64,
    /// Header flags: [`SEGMENT_FLAG_RECYCLED`] or 0 (always 0 in version 1).
    pub flags: u32,
}

impl SegmentHeader {
    /// Writes the 64-byte header, CRC included.
    pub fn encode(&self, out: &mut [u8; SEGMENT_HEADER_BYTES]) {
        out.fill(0);
        out[0..8].copy_from_slice(&SEGMENT_MAGIC);
        out[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        out[12..16].copy_from_slice(&(SEGMENT_HEADER_BYTES as u32).to_le_bytes());
        out[16..20].copy_from_slice(&self.shard.to_le_bytes());
        out[20..24].copy_from_slice(&self.flags.to_le_bytes());
        out[24..32].copy_from_slice(&self.sequence.to_le_bytes());
        out[32..40].copy_from_slice(&self.segment_bytes.to_le_bytes());
        out[40..48].copy_from_slice(&self.created_ms.to_le_bytes());
        // 48..60: reserved, zero.
        let crc = crc32fast::hash(&out[0..60]);
        out[60..64].copy_from_slice(&crc.to_le_bytes());
    }

    /// Reads and checks a segment header from the first bytes of a segment.
    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, FormatError> {
        if bytes.len() < SEGMENT_HEADER_BYTES {
            return Err(FormatError::Truncated {
                needed: SEGMENT_HEADER_BYTES as u64,
                available: bytes.len() as u64,
            });
        }
        let magic: [u8; 8] = bytes[0..8].try_into().expect("8 bytes");
        if magic != SEGMENT_MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        let stored = u32_at(bytes, 60);
        let computed = crc32fast::hash(&bytes[0..60]);
        if stored != computed {
            return Err(FormatError::HeaderCrc { stored, computed });
        }
        let format_version = u32_at(bytes, 8);
        if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&format_version) {
            return Err(FormatError::UnsupportedVersion {
                found: format_version,
            });
        }
        // Version 1 has no flags; a bit this build does not know could change how the segment
        // must be read, so it is refused like any other unknown field.
        let flags = u32_at(bytes, 20);
        let known = if format_version == 1 {
            0
        } else {
            SEGMENT_FLAGS_KNOWN
        };
        if flags & !known != 0 {
            return Err(FormatError::UnknownFlags {
                flags,
                version: format_version,
            });
        }
        let header_bytes = u32_at(bytes, 12);
        if header_bytes as usize != SEGMENT_HEADER_BYTES {
            return Err(FormatError::BadHeaderSize {
                found: header_bytes,
            });
        }
        Ok(SegmentHeader {
            format_version,
            shard: u32_at(bytes, 16),
            sequence: u64_at(bytes, 24),
            segment_bytes: u64_at(bytes, 32),
            created_ms: u64_at(bytes, 40),
            flags,
        })
    }

    /// Whether the file held an earlier segment: its data ends at the first end marker and the
    /// bytes after it are leftovers, not damage.
    pub fn is_recycled(&self) -> bool {
        self.flags & SEGMENT_FLAG_RECYCLED != 0
    }
}

/// Whether a segment's data ends at offset `at` of its bytes: an end marker there (H = 0 and
/// B = 0), a remainder shorter than the framing that is all zeros, or the segment's end. In a
/// recycled segment this, right after the last good record, is what makes its tail clean.
pub fn ends_data_at(bytes: &[u8], at: u64) -> bool {
    let Some(rest) = usize::try_from(at).ok().and_then(|at| bytes.get(at..)) else {
        return true;
    };
    rest[..rest.len().min(FRAME_BYTES)].iter().all(|&b| b == 0)
}

/// The broker's message id in binary (`MessageId`: the shard whose session accepted the SEND
/// and that shard's counter), as a version 3 message record stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BinaryId {
    pub shard: u16,
    pub seq: u64,
}

impl BinaryId {
    /// The `message-id` text the broker sends for it: `<shard>-<seq>`.
    pub fn to_text(&self) -> String {
        format!("{}-{}", self.shard, self.seq)
    }

    /// Parses `<shard>-<seq>` (the broker's `message-id` text, as version 1 and 2 records of
    /// this broker hold it); `None` for anything else (an id another tool wrote).
    pub fn parse_text(text: &[u8]) -> Option<BinaryId> {
        let text = std::str::from_utf8(text).ok()?;
        let (shard, seq) = text.split_once('-')?;
        Some(BinaryId {
            shard: shard.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

/// A stored message id: binary from version 3 on, the `message-id` text the writer gave in
/// versions 1 and 2 (borrowed from the segment, or owned once recovery copies it out).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StoredId<'a> {
    Binary(BinaryId),
    Text(Cow<'a, [u8]>),
}

impl StoredId<'_> {
    /// The binary id: as stored (version 3), or parsed from text the broker wrote
    /// (`<shard>-<seq>`, versions 1 and 2); `None` for text in another form.
    pub fn binary(&self) -> Option<BinaryId> {
        match self {
            StoredId::Binary(id) => Some(*id),
            StoredId::Text(text) => BinaryId::parse_text(text),
        }
    }

    /// The id as `message-id` text: as stored, or rendered `<shard>-<seq>`.
    pub fn text(&self) -> Cow<'_, [u8]> {
        match self {
            StoredId::Binary(id) => Cow::Owned(id.to_text().into_bytes()),
            StoredId::Text(text) => Cow::Borrowed(text),
        }
    }

    /// The same id, owning its text.
    pub fn into_owned(self) -> StoredId<'static> {
        match self {
            StoredId::Binary(id) => StoredId::Binary(id),
            StoredId::Text(text) => StoredId::Text(Cow::Owned(text.into_owned())),
        }
    }
}

/// A message to store: what the broker keeps of a SEND frame. Written as a version 3 record.
#[derive(Clone, Copy, Debug)]
pub struct MessageRecord<'a> {
    /// The queue it was sent to.
    pub destination: &'a [u8],
    /// The id the broker assigned.
    pub id: BinaryId,
    /// When the broker accepted it, Unix milliseconds, as given by the caller.
    pub timestamp_ms: u64,
    /// The SEND headers the broker keeps for the MESSAGE frame, as `Message::header_block`
    /// holds them: `name:value\n` lines with STOMP 1.2 escapes. Stored as is; empty, or ending
    /// with a newline.
    pub header_block: &'a [u8],
    /// No header in the block needed an escape (`Message::header_block_plain`).
    pub block_plain: bool,
    /// A non-persistent message written only to free memory: recovery never brings it back
    /// (see [`MESSAGE_FLAG_TRANSIENT`]).
    pub transient: bool,
    /// The message body.
    pub body: &'a [u8],
}

impl MessageRecord<'_> {
    /// The flags byte of its record.
    pub fn flags(&self) -> u8 {
        let mut flags = 0;
        if self.transient {
            flags |= MESSAGE_FLAG_TRANSIENT;
        }
        if self.block_plain {
            flags |= MESSAGE_FLAG_BLOCK_PLAIN;
        }
        flags
    }
}

/// A message in the version 1 and 2 layout (text id, unescaped header entries). This build
/// never appends one; it exists so that tests and tools can build old-format segments
/// ([`encode_legacy_message`]).
#[derive(Clone, Copy, Debug)]
pub struct LegacyMessageRecord<'a> {
    pub destination: &'a [u8],
    pub message_id: &'a [u8],
    pub timestamp_ms: u64,
    pub headers: &'a [Header<'a>],
    pub body: &'a [u8],
}

impl LegacyMessageRecord<'_> {
    /// Length of the header part.
    pub fn header_len(&self) -> usize {
        MESSAGE_FIXED_BYTES
            + self.destination.len()
            + self.message_id.len()
            + self
                .headers
                .iter()
                .map(|h| HEADER_ENTRY_FIXED_BYTES + h.name.len() + h.value.len())
                .sum::<usize>()
    }

    /// Bytes the record takes in a segment, padding included.
    pub fn encoded_len(&self) -> usize {
        record_len(self.header_len() as u64, self.body.len() as u64) as usize
    }
}

/// A record to append.
#[derive(Clone, Copy, Debug)]
pub enum RecordRef<'a> {
    Message(MessageRecord<'a>),
    /// These messages are done and never come back.
    Ack(&'a [Position]),
    /// These messages were handed to a consumer; after a crash they come back redelivered.
    Delivered(&'a [Position]),
}

impl RecordRef<'_> {
    /// Length of the header part (the u64 stored first in the framing).
    pub fn header_len(&self) -> usize {
        match self {
            RecordRef::Message(m) => {
                MESSAGE_V3_FIXED_BYTES + m.destination.len() + m.header_block.len()
            }
            RecordRef::Ack(refs) | RecordRef::Delivered(refs) => {
                REFS_FIXED_BYTES + REF_BYTES * refs.len()
            }
        }
    }

    /// Length of the body (the second u64 of the framing).
    pub fn body_len(&self) -> usize {
        match self {
            RecordRef::Message(m) => m.body.len(),
            RecordRef::Ack(_) | RecordRef::Delivered(_) => 0,
        }
    }

    /// Bytes the record takes in a segment, padding included.
    pub fn encoded_len(&self) -> usize {
        record_len(self.header_len() as u64, self.body_len() as u64) as usize
    }
}

/// Bytes a record with these part lengths takes, padding included.
pub fn record_len(header_len: u64, body_len: u64) -> u64 {
    let raw = (FRAME_BYTES + CRC_BYTES) as u64 + header_len + body_len;
    raw.div_ceil(RECORD_ALIGN as u64) * RECORD_ALIGN as u64
}

/// The CRC of a record: seeded with the segment sequence so that a record is only valid in the
/// segment it was written to.
fn record_crc(segment_sequence: u64, framed: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&segment_sequence.to_le_bytes());
    hasher.update(framed);
    hasher.finalize()
}

/// Encodes `record` at the start of `out` and returns its length (padding included). Writes
/// nothing past the record.
///
/// Panics if `out` is shorter than `record.encoded_len()` or a
/// field exceeds its on-disk width: the writer checks both before it calls this.
pub fn encode_record(out: &mut [u8], segment_sequence: u64, record: &RecordRef<'_>) -> usize {
    encode(out, segment_sequence, record, false)
}

/// Encodes `record` at the start of `out`, `out` running to the end of the segment, followed by
/// an end marker: up to [`FRAME_BYTES`] zero bytes right after the record (as many as `out`
/// holds), written before the record's own framing. Returns the record's length (padding
/// included, end marker not). This is how the writer appends from format version 2 on: in a
/// recycled segment the marker ends the data before the leftovers of the file's earlier use; in
/// a fresh one it overwrites zeros in the cache line just written.
pub fn encode_record_with_end_marker(
    out: &mut [u8],
    segment_sequence: u64,
    record: &RecordRef<'_>,
) -> usize {
    encode(out, segment_sequence, record, true)
}

fn encode(
    out: &mut [u8],
    segment_sequence: u64,
    record: &RecordRef<'_>,
    end_marker: bool,
) -> usize {
    let header_len = record.header_len();
    let body_len = record.body_len();
    let len = record.encoded_len();
    assert!(
        out.len() >= len,
        "record of {len} bytes into {} bytes",
        out.len()
    );
    let mut at = FRAME_BYTES;
    match record {
        RecordRef::Message(m) => {
            debug_assert!(
                m.header_block.last().map_or(true, |&b| b == b'\n'),
                "a header block ends with a newline"
            );
            out[at] = KIND_MESSAGE;
            out[at + 1] = m.flags();
            out[at + 2..at + 4].fill(0);
            put_u32_len(out, at + 4, m.header_block.len());
            out[at + 8..at + 16].copy_from_slice(&m.timestamp_ms.to_le_bytes());
            put_u32_len(out, at + 16, m.destination.len());
            out[at + 20..at + 22].copy_from_slice(&m.id.shard.to_le_bytes());
            out[at + 22..at + 24].fill(0);
            out[at + 24..at + 32].copy_from_slice(&m.id.seq.to_le_bytes());
            at += MESSAGE_V3_FIXED_BYTES;
            at = put_bytes(out, at, m.destination);
            at = put_bytes(out, at, m.header_block);
            debug_assert_eq!(at, FRAME_BYTES + header_len);
            at = put_bytes(out, at, m.body);
        }
        RecordRef::Ack(refs) | RecordRef::Delivered(refs) => {
            out[at] = if matches!(record, RecordRef::Ack(_)) {
                KIND_ACK
            } else {
                KIND_DELIVERED
            };
            out[at + 1] = 0;
            out[at + 2..at + 4].fill(0);
            put_u32_len(out, at + 4, refs.len());
            at += REFS_FIXED_BYTES;
            for p in refs.iter() {
                out[at..at + 8].copy_from_slice(&p.segment.to_le_bytes());
                out[at + 8..at + 16].copy_from_slice(&p.offset.to_le_bytes());
                at += REF_BYTES;
            }
        }
    }
    finish_record(out, segment_sequence, header_len, body_len, at, end_marker)
}

/// Encodes a message in the version 1 and 2 layout at the start of `out` (no end marker) and
/// returns its length, padding included. For tests and tools that build segments of those
/// versions; the log never appends one. Panics as [`encode_record`] does.
pub fn encode_legacy_message(
    out: &mut [u8],
    segment_sequence: u64,
    m: &LegacyMessageRecord<'_>,
) -> usize {
    let header_len = m.header_len();
    let len = m.encoded_len();
    assert!(
        out.len() >= len,
        "record of {len} bytes into {} bytes",
        out.len()
    );
    let mut at = FRAME_BYTES;
    let header_count = u32::try_from(m.headers.len()).expect("header count fits the u32 field");
    out[at] = KIND_MESSAGE;
    out[at + 1] = 0;
    out[at + 2..at + 4].fill(0);
    out[at + 4..at + 8].copy_from_slice(&header_count.to_le_bytes());
    out[at + 8..at + 16].copy_from_slice(&m.timestamp_ms.to_le_bytes());
    put_u32_len(out, at + 16, m.destination.len());
    put_u32_len(out, at + 20, m.message_id.len());
    at += MESSAGE_FIXED_BYTES;
    at = put_bytes(out, at, m.destination);
    at = put_bytes(out, at, m.message_id);
    for h in m.headers {
        put_u32_len(out, at, h.name.len());
        put_u32_len(out, at + 4, h.value.len());
        at += HEADER_ENTRY_FIXED_BYTES;
        at = put_bytes(out, at, &h.name);
        at = put_bytes(out, at, &h.value);
    }
    debug_assert_eq!(at, FRAME_BYTES + header_len);
    at = put_bytes(out, at, m.body);
    finish_record(out, segment_sequence, header_len, m.body.len(), at, false)
}

/// Writes the CRC, the padding, the end marker if asked, and the framing last, for a record
/// whose header part and body end at `at`. Returns its length, padding included.
fn finish_record(
    out: &mut [u8],
    segment_sequence: u64,
    header_len: usize,
    body_len: usize,
    at: usize,
    end_marker: bool,
) -> usize {
    let len = record_len(header_len as u64, body_len as u64) as usize;
    assert_eq!(at, FRAME_BYTES + header_len + body_len);
    let mut frame = [0u8; FRAME_BYTES];
    frame[0..8].copy_from_slice(&(header_len as u64).to_le_bytes());
    frame[8..16].copy_from_slice(&(body_len as u64).to_le_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&segment_sequence.to_le_bytes());
    hasher.update(&frame);
    hasher.update(&out[FRAME_BYTES..at]);
    let crc = hasher.finalize();
    out[at..at + CRC_BYTES].copy_from_slice(&crc.to_le_bytes());
    out[at + CRC_BYTES..len].fill(0);
    if end_marker {
        let end = out.len().min(len + FRAME_BYTES);
        out[len..end].fill(0);
    }
    // The framing goes in last: a reader of a record still being written then usually sees a
    // zero header length (the end of the data) rather than a record that fails its CRC. Readers
    // check the CRC regardless, so this is a courtesy to the inspection tool, not a guarantee.
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::Release);
    out[0..FRAME_BYTES].copy_from_slice(&frame);
    len
}

fn put_u32_len(out: &mut [u8], at: usize, len: usize) {
    let len = u32::try_from(len).expect("length fits the u32 field");
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

fn put_bytes(out: &mut [u8], at: usize, bytes: &[u8]) -> usize {
    out[at..at + bytes.len()].copy_from_slice(bytes);
    at + bytes.len()
}

/// A decoded message record of any format version, borrowing the segment's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageView<'a> {
    pub destination: &'a [u8],
    pub timestamp_ms: u64,
    pub body: &'a [u8],
    id: IdBytes<'a>,
    headers: StoredHeaders<'a>,
    flags: u8,
}

/// The id as the record holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IdBytes<'a> {
    Binary(BinaryId),
    Text(&'a [u8]),
}

/// A message record's headers as its format version stores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredHeaders<'a> {
    /// Versions 1 and 2: unescaped `(name, value)` entries.
    Entries(HeaderIter<'a>),
    /// Version 3: `name:value\n` lines as the broker holds them (STOMP 1.2 escapes unless
    /// `plain`), ready to splice into a MESSAGE frame.
    Block { bytes: &'a [u8], plain: bool },
}

impl<'a> MessageView<'a> {
    /// The stored id: binary (version 3) or the text the writer gave (versions 1 and 2).
    pub fn message_id(&self) -> StoredId<'a> {
        match self.id {
            IdBytes::Binary(id) => StoredId::Binary(id),
            IdBytes::Text(text) => StoredId::Text(Cow::Borrowed(text)),
        }
    }

    /// The record's flags byte (0 in versions 1 and 2).
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// A non-persistent message written only to save memory ([`MESSAGE_FLAG_TRANSIENT`]):
    /// recovery never restores it.
    pub fn is_transient(&self) -> bool {
        self.flags & MESSAGE_FLAG_TRANSIENT != 0
    }

    /// The headers in the form the record stores them.
    pub fn stored_headers(&self) -> StoredHeaders<'a> {
        self.headers
    }

    /// The header block ready to splice into a MESSAGE frame, and whether it is plain (valid
    /// unescaped for every STOMP version): borrowed as stored in version 3, built by escaping
    /// the entries for STOMP 1.2 in versions 1 and 2.
    pub fn header_block(&self) -> (Cow<'a, [u8]>, bool) {
        match self.headers {
            StoredHeaders::Block { bytes, plain } => (Cow::Borrowed(bytes), plain),
            StoredHeaders::Entries(entries) => {
                let mut block = Vec::new();
                let mut plain = true;
                for (name, value) in entries {
                    let before = block.len();
                    escape_into(&mut block, name, Escaping::V1_2);
                    block.push(b':');
                    escape_into(&mut block, value, Escaping::V1_2);
                    block.push(b'\n');
                    plain &= block.len() - before == name.len() + value.len() + 2;
                }
                (Cow::Owned(block), plain)
            }
        }
    }

    /// The stored STOMP headers, unescaped, in the order they were appended. Borrowed unless
    /// a version 3 block needed an escape; a block line without a colon or with a bad escape is
    /// left out (the broker never writes one).
    pub fn headers(&self) -> Headers<'a> {
        match self.headers {
            StoredHeaders::Entries(entries) => Headers::Entries(entries),
            StoredHeaders::Block { bytes, plain } => Headers::Block {
                lines: bytes,
                escaping: if plain {
                    Escaping::None
                } else {
                    Escaping::V1_2
                },
            },
        }
    }

    /// The `expires` header as Unix milliseconds; 0 when absent or not a number (never). The
    /// first `expires` header counts, as on a SEND.
    pub fn expires_ms(&self) -> u64 {
        let value = match self.headers {
            StoredHeaders::Entries(mut entries) => entries
                .find(|(name, _)| *name == b"expires")
                .map(|(_, value)| value),
            // "expires" needs no escape, so its line starts so in any block.
            StoredHeaders::Block { bytes, .. } => bytes
                .split(|&b| b == b'\n')
                .find_map(|line| line.strip_prefix(b"expires:")),
        };
        value
            .and_then(|value| std::str::from_utf8(value).ok()?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Bytes of the destination and the headers as `name:value` lines (unescaped in versions 1
    /// and 2, the block as stored in version 3, as `Paged::of` counts it): close to what a
    /// MESSAGE frame carries besides the body.
    pub fn head_bytes(&self) -> usize {
        let lines: usize = match self.headers {
            StoredHeaders::Entries(entries) => entries.map(|(n, v)| n.len() + v.len() + 2).sum(),
            StoredHeaders::Block { bytes, .. } => bytes.len(),
        };
        self.destination.len() + lines
    }

    /// Number of stored headers (lines of a version 3 block).
    pub fn header_count(&self) -> usize {
        match self.headers {
            StoredHeaders::Entries(entries) => entries.remaining as usize,
            StoredHeaders::Block { bytes, .. } => memchr::memchr_iter(b'\n', bytes).count(),
        }
    }

    /// The stored headers as owned codec headers, unescaped, for a message that outlives the
    /// map.
    pub fn headers_owned(&self) -> Vec<Header<'static>> {
        self.headers()
            .map(|(n, v)| Header {
                name: Cow::Owned(n.into_owned()),
                value: Cow::Owned(v.into_owned()),
            })
            .collect()
    }
}

/// Iterates the headers of a [`MessageView`], unescaped, whatever the record's version.
#[derive(Clone, Debug)]
pub enum Headers<'a> {
    Entries(HeaderIter<'a>),
    Block { lines: &'a [u8], escaping: Escaping },
}

impl<'a> Iterator for Headers<'a> {
    type Item = (Cow<'a, [u8]>, Cow<'a, [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Headers::Entries(entries) => entries
                .next()
                .map(|(n, v)| (Cow::Borrowed(n), Cow::Borrowed(v))),
            Headers::Block { lines, escaping } => loop {
                if lines.is_empty() {
                    return None;
                }
                let end = memchr::memchr(b'\n', lines).unwrap_or(lines.len());
                let line = &lines[..end];
                *lines = &lines[(end + 1).min(lines.len())..];
                // In an escaped block the first raw ':' is the separator.
                let Some(colon) = memchr::memchr(b':', line) else {
                    continue;
                };
                if let (Ok(name), Ok(value)) = (
                    unescape(&line[..colon], *escaping, 0),
                    unescape(&line[colon + 1..], *escaping, 0),
                ) {
                    return Some((name, value));
                }
            },
        }
    }
}

/// Iterates the header entries of a version 1 or 2 message record; the layout was checked when
/// it was decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderIter<'a> {
    bytes: &'a [u8],
    remaining: u32,
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let name_len = u32_at(self.bytes, 0) as usize;
        let value_len = u32_at(self.bytes, 4) as usize;
        let rest = &self.bytes[HEADER_ENTRY_FIXED_BYTES..];
        let (name, rest) = rest.split_at(name_len);
        let (value, rest) = rest.split_at(value_len);
        self.bytes = rest;
        Some((name, value))
    }
}

/// The message references of an ack or delivered record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PositionList<'a> {
    bytes: &'a [u8],
}

impl<'a> PositionList<'a> {
    pub fn len(&self) -> usize {
        self.bytes.len() / REF_BYTES
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = Position> + 'a {
        self.bytes.chunks_exact(REF_BYTES).map(|c| Position {
            segment: u64_at(c, 0),
            offset: u64_at(c, 8),
        })
    }
}

/// A decoded record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordView<'a> {
    Message(MessageView<'a>),
    Ack(PositionList<'a>),
    Delivered(PositionList<'a>),
}

/// What lies at an offset of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole record whose CRC and layout check out; `len` includes padding.
    Record { record: RecordView<'a>, len: usize },
    /// A zero header length: the segment's data ends here.
    End,
    /// The framing cannot be trusted (it points outside the segment or is implausible), so the
    /// next record's offset is unknown.
    Unframed(FormatError),
    /// The framing is plausible but the record is damaged (or still being written): skipping
    /// `len` bytes reaches where the next record would start.
    Corrupt { len: usize, error: FormatError },
}

/// Decodes the record at the start of `bytes`, which runs to the end of a segment of the
/// current format version ([`FORMAT_VERSION`]), the only version the log appends.
pub fn decode_record(bytes: &[u8], segment_sequence: u64) -> Decoded<'_> {
    decode_record_as(bytes, segment_sequence, FORMAT_VERSION)
}

/// Decodes the record at the start of `bytes`, which runs to the end of a segment written in
/// `format_version` (from its header): message records are laid out as that version says.
pub fn decode_record_as(bytes: &[u8], segment_sequence: u64, format_version: u32) -> Decoded<'_> {
    if bytes.len() < FRAME_BYTES {
        // Too short to hold framing: zeros mean the end, anything else is a torn tail.
        return if bytes.iter().all(|&b| b == 0) {
            Decoded::End
        } else {
            Decoded::Unframed(FormatError::Truncated {
                needed: FRAME_BYTES as u64,
                available: bytes.len() as u64,
            })
        };
    }
    let header_len = u64_at(bytes, 0);
    let body_len = u64_at(bytes, 8);
    if header_len == 0 && body_len == 0 {
        return Decoded::End;
    }
    let min_header = REFS_FIXED_BYTES as u64;
    let available = bytes.len() as u64;
    let framing_ok = header_len >= min_header
        && header_len <= available
        && body_len <= available
        && record_len(header_len, body_len) <= available;
    if !framing_ok {
        return Decoded::Unframed(FormatError::BadFraming {
            header_len,
            body_len,
        });
    }
    let len = record_len(header_len, body_len) as usize;
    let header_end = FRAME_BYTES + header_len as usize;
    let body_end = header_end + body_len as usize;
    let stored = u32_at(bytes, body_end);
    let computed = record_crc(segment_sequence, &bytes[..body_end]);
    if stored != computed {
        return Decoded::Corrupt {
            len,
            error: FormatError::RecordCrc { stored, computed },
        };
    }
    match parse_header_part(
        &bytes[FRAME_BYTES..header_end],
        &bytes[header_end..body_end],
        format_version,
    ) {
        Ok(record) => {
            // The second half of the assert pair in `encode_record`: what was read is exactly
            // as long as its framing says.
            debug_assert_eq!(record_len(header_len, body_len) as usize, len);
            Decoded::Record { record, len }
        }
        Err(error) => Decoded::Corrupt { len, error },
    }
}

fn parse_header_part<'a>(
    part: &'a [u8],
    body: &'a [u8],
    format_version: u32,
) -> Result<RecordView<'a>, FormatError> {
    let kind = part[0];
    if !matches!(kind, KIND_MESSAGE | KIND_ACK | KIND_DELIVERED) {
        return Err(FormatError::UnknownKind { kind });
    }
    let flags = part[1];
    let known_flags = if kind == KIND_MESSAGE && format_version >= FORMAT_VERSION_BLOCK {
        MESSAGE_FLAGS_KNOWN
    } else {
        0
    };
    if flags & !known_flags != 0 {
        return Err(FormatError::BadField {
            field: "flags",
            offset: 1,
        });
    }
    if part[2..4] != [0, 0] {
        return Err(FormatError::BadField {
            field: "reserved",
            offset: 2,
        });
    }
    let count = u32_at(part, 4) as usize;
    match kind {
        KIND_MESSAGE if format_version >= FORMAT_VERSION_BLOCK => {
            parse_message_v3(part, body, flags, count)
        }
        KIND_MESSAGE => {
            if part.len() < MESSAGE_FIXED_BYTES {
                return Err(FormatError::BadField {
                    field: "message header part",
                    offset: 0,
                });
            }
            let timestamp_ms = u64_at(part, 8);
            let destination_len = u32_at(part, 16) as usize;
            let message_id_len = u32_at(part, 20) as usize;
            let mut at = MESSAGE_FIXED_BYTES;
            let destination = take(part, &mut at, destination_len, "destination")?;
            let message_id = take(part, &mut at, message_id_len, "message id")?;
            let headers_start = at;
            for _ in 0..count {
                let fixed = take(part, &mut at, HEADER_ENTRY_FIXED_BYTES, "header lengths")?;
                let name_len = u32_at(fixed, 0) as usize;
                let value_len = u32_at(fixed, 4) as usize;
                take(part, &mut at, name_len, "header name")?;
                take(part, &mut at, value_len, "header value")?;
            }
            if at != part.len() {
                return Err(FormatError::BadField {
                    field: "message header part length",
                    offset: at,
                });
            }
            Ok(RecordView::Message(MessageView {
                destination,
                timestamp_ms,
                body,
                id: IdBytes::Text(message_id),
                headers: StoredHeaders::Entries(HeaderIter {
                    bytes: &part[headers_start..],
                    remaining: count as u32,
                }),
                flags: 0,
            }))
        }
        KIND_ACK | KIND_DELIVERED => {
            let refs_len = count.checked_mul(REF_BYTES);
            if refs_len.and_then(|l| l.checked_add(REFS_FIXED_BYTES)) != Some(part.len()) {
                return Err(FormatError::BadField {
                    field: "reference count",
                    offset: 4,
                });
            }
            if !body.is_empty() {
                return Err(FormatError::BadField {
                    field: "body of a reference record",
                    offset: part.len(),
                });
            }
            let list = PositionList {
                bytes: &part[REFS_FIXED_BYTES..],
            };
            Ok(if kind == KIND_ACK {
                RecordView::Ack(list)
            } else {
                RecordView::Delivered(list)
            })
        }
        kind => Err(FormatError::UnknownKind { kind }),
    }
}

/// A version 3 message header part (`block_len` is the u32 at offset 4): fixed fields, the
/// destination, then the header block, ending exactly at the end of the part.
fn parse_message_v3<'a>(
    part: &'a [u8],
    body: &'a [u8],
    flags: u8,
    block_len: usize,
) -> Result<RecordView<'a>, FormatError> {
    if part.len() < MESSAGE_V3_FIXED_BYTES {
        return Err(FormatError::BadField {
            field: "message header part",
            offset: 0,
        });
    }
    if part[22..24] != [0, 0] {
        return Err(FormatError::BadField {
            field: "reserved",
            offset: 22,
        });
    }
    let timestamp_ms = u64_at(part, 8);
    let destination_len = u32_at(part, 16) as usize;
    let id = BinaryId {
        shard: u16::from_le_bytes([part[20], part[21]]),
        seq: u64_at(part, 24),
    };
    let mut at = MESSAGE_V3_FIXED_BYTES;
    let destination = take(part, &mut at, destination_len, "destination")?;
    let block_at = at;
    let block = take(part, &mut at, block_len, "header block")?;
    if at != part.len() {
        return Err(FormatError::BadField {
            field: "message header part length",
            offset: at,
        });
    }
    // Spliced into MESSAGE frames as is: a block that does not end its last line would run
    // into the next header.
    if block.last().is_some_and(|&b| b != b'\n') {
        return Err(FormatError::BadField {
            field: "header block end",
            offset: block_at,
        });
    }
    Ok(RecordView::Message(MessageView {
        destination,
        timestamp_ms,
        body,
        id: IdBytes::Binary(id),
        headers: StoredHeaders::Block {
            bytes: block,
            plain: flags & MESSAGE_FLAG_BLOCK_PLAIN != 0,
        },
        flags,
    }))
}

fn take<'a>(
    part: &'a [u8],
    at: &mut usize,
    len: usize,
    field: &'static str,
) -> Result<&'a [u8], FormatError> {
    let end = at
        .checked_add(len)
        .filter(|&end| end <= part.len())
        .ok_or(FormatError::BadField { field, offset: *at })?;
    let bytes = &part[*at..end];
    *at = end;
    Ok(bytes)
}

/// One step of a [`SegmentScan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanItem<'a> {
    /// A good record at `offset`, `len` bytes long.
    Record {
        offset: u64,
        len: u64,
        record: RecordView<'a>,
    },
    /// A damaged record at `offset`; the scan goes on after its `len` bytes.
    Corrupt {
        offset: u64,
        len: u64,
        error: FormatError,
    },
    /// Framing at `offset` cannot be trusted; the scan stops here.
    Unframed { offset: u64, error: FormatError },
}

/// Walks the records of one segment's bytes (the whole file, header included). Used by
/// recovery and by the inspection tool, which must not fail on a segment being written: an
/// incomplete last record shows as `Corrupt` or `Unframed` and the scan ends there.
#[derive(Clone, Debug)]
pub struct SegmentScan<'a> {
    bytes: &'a [u8],
    sequence: u64,
    format_version: u32,
    offset: usize,
    done: bool,
}

impl<'a> SegmentScan<'a> {
    /// Scans `bytes` (a whole segment) from the first record on, reading records in the format
    /// version its header names; bytes without a valid header (a test's or a fuzzer's) are read
    /// in the current version.
    pub fn new(bytes: &'a [u8], sequence: u64) -> SegmentScan<'a> {
        let format_version = SegmentHeader::decode(bytes)
            .map(|header| header.format_version)
            .unwrap_or(FORMAT_VERSION);
        SegmentScan::with_version(bytes, sequence, format_version)
    }

    /// Scans `bytes` (a whole segment) whose records are in `format_version`.
    pub fn with_version(bytes: &'a [u8], sequence: u64, format_version: u32) -> SegmentScan<'a> {
        SegmentScan {
            bytes,
            sequence,
            format_version,
            offset: SEGMENT_HEADER_BYTES.min(bytes.len()),
            done: false,
        }
    }

    /// Where the scan stands: after the last item returned, or where the data ended.
    pub fn offset(&self) -> u64 {
        self.offset as u64
    }
}

impl<'a> Iterator for SegmentScan<'a> {
    type Item = ScanItem<'a>;

    fn next(&mut self) -> Option<ScanItem<'a>> {
        if self.done {
            return None;
        }
        let offset = self.offset as u64;
        match decode_record_as(
            &self.bytes[self.offset..],
            self.sequence,
            self.format_version,
        ) {
            Decoded::End => {
                self.done = true;
                None
            }
            Decoded::Record { record, len } => {
                self.offset += len;
                Some(ScanItem::Record {
                    offset,
                    len: len as u64,
                    record,
                })
            }
            Decoded::Corrupt { len, error } => {
                self.offset += len;
                Some(ScanItem::Corrupt {
                    offset,
                    len: len as u64,
                    error,
                })
            }
            Decoded::Unframed(error) => {
                self.done = true;
                Some(ScanItem::Unframed { offset, error })
            }
        }
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message<'a>(header_block: &'a [u8], body: &'a [u8]) -> RecordRef<'a> {
        RecordRef::Message(MessageRecord {
            destination: b"/queue/a",
            id: BinaryId { shard: 1, seq: 7 },
            timestamp_ms: 1_700_000_000_000,
            header_block,
            block_plain: !header_block.contains(&b'\\'),
            transient: false,
            body,
        })
    }

    /// A segment-sized buffer holding `records` after a blank header area.
    fn segment_with(records: &[RecordRef<'_>], sequence: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; 4096];
        let mut at = SEGMENT_HEADER_BYTES;
        for r in records {
            at += encode_record(&mut bytes[at..], sequence, r);
        }
        bytes
    }

    #[test]
    fn segment_header_round_trips_and_is_64_bytes() {
        let header = SegmentHeader {
            format_version: FORMAT_VERSION,
            shard: 3,
            sequence: 42,
            segment_bytes: 65536,
            created_ms: 123,
            flags: 0,
        };
        let mut bytes = [0u8; SEGMENT_HEADER_BYTES];
        header.encode(&mut bytes);
        assert_eq!(&bytes[..8], b"STOMPDLG");
        assert_eq!(SegmentHeader::decode(&bytes), Ok(header));
    }

    #[test]
    fn segment_header_errors_are_specific() {
        let header = SegmentHeader {
            format_version: FORMAT_VERSION,
            shard: 0,
            sequence: 0,
            segment_bytes: 4096,
            created_ms: 0,
            flags: 0,
        };
        let mut bytes = [0u8; SEGMENT_HEADER_BYTES];
        header.encode(&mut bytes);
        assert!(matches!(
            SegmentHeader::decode(&bytes[..63]),
            Err(FormatError::Truncated {
                needed: 64,
                available: 63
            })
        ));
        let mut bad = bytes;
        bad[0] = b'X';
        assert!(matches!(
            SegmentHeader::decode(&bad),
            Err(FormatError::BadMagic { .. })
        ));
        let mut bad = bytes;
        bad[30] ^= 1;
        assert!(matches!(
            SegmentHeader::decode(&bad),
            Err(FormatError::HeaderCrc { .. })
        ));
        // A future version with a valid CRC is refused by version, not by CRC.
        let with_crc = |mut bytes: [u8; SEGMENT_HEADER_BYTES]| {
            let crc = crc32fast::hash(&bytes[..60]);
            bytes[60..64].copy_from_slice(&crc.to_le_bytes());
            bytes
        };
        let mut future = bytes;
        future[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        assert_eq!(
            SegmentHeader::decode(&with_crc(future)),
            Err(FormatError::UnsupportedVersion {
                found: FORMAT_VERSION + 1
            })
        );
        // Version 2 knows one flag (recycled); any other bit is refused, and version 1 knows
        // none.
        for (version, flags, known) in [
            (2u32, 1u32, true),
            (2, 2, false),
            (2, 3, false),
            (1, 1, false),
        ] {
            let mut flagged = bytes;
            flagged[8..12].copy_from_slice(&version.to_le_bytes());
            flagged[20..24].copy_from_slice(&flags.to_le_bytes());
            let decoded = SegmentHeader::decode(&with_crc(flagged));
            if known {
                assert!(decoded.unwrap().is_recycled());
            } else {
                assert_eq!(decoded, Err(FormatError::UnknownFlags { flags, version }));
            }
        }
    }

    /// The version 3 message record of docs/log-format.md ("Kind 1: message, version 3"), byte
    /// by byte.
    #[test]
    fn message_layout_is_exactly_as_documented() {
        let record = message(b"persistent:true\n", b"hi");
        let mut out = vec![0xAAu8; 256];
        let len = encode_record(&mut out, 7, &record);
        let header_len = 32 + 8 + 16;
        assert_eq!(
            u64::from_le_bytes(out[0..8].try_into().unwrap()),
            header_len as u64
        );
        assert_eq!(u64::from_le_bytes(out[8..16].try_into().unwrap()), 2);
        assert_eq!(out[16], KIND_MESSAGE);
        assert_eq!(out[17], MESSAGE_FLAG_BLOCK_PLAIN);
        assert_eq!(&out[18..20], &[0, 0]);
        assert_eq!(u32::from_le_bytes(out[20..24].try_into().unwrap()), 16);
        assert_eq!(
            u64::from_le_bytes(out[24..32].try_into().unwrap()),
            1_700_000_000_000
        );
        assert_eq!(u32::from_le_bytes(out[32..36].try_into().unwrap()), 8);
        assert_eq!(u16::from_le_bytes(out[36..38].try_into().unwrap()), 1);
        assert_eq!(&out[38..40], &[0, 0]);
        assert_eq!(u64::from_le_bytes(out[40..48].try_into().unwrap()), 7);
        assert_eq!(&out[48..56], b"/queue/a");
        assert_eq!(&out[56..72], b"persistent:true\n");
        assert_eq!(&out[72..74], b"hi");
        let body_end = 16 + header_len + 2;
        assert_eq!(body_end, 74);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&7u64.to_le_bytes());
        crc.update(&out[..body_end]);
        assert_eq!(
            u32::from_le_bytes(out[74..78].try_into().unwrap()),
            crc.finalize()
        );
        assert_eq!(len, 80, "78 bytes padded to a multiple of 8");
        assert_eq!(&out[78..80], &[0, 0], "padding is zero");
        assert_eq!(out[80], 0xAA, "nothing written past the record");

        let Decoded::Record {
            record: RecordView::Message(m),
            len: 80,
        } = decode_record(&out, 7)
        else {
            panic!("{:?}", decode_record(&out, 7));
        };
        assert_eq!(
            m.message_id(),
            StoredId::Binary(BinaryId { shard: 1, seq: 7 })
        );
        assert_eq!(m.message_id().text(), &b"1-7"[..]);
        assert_eq!(
            m.stored_headers(),
            StoredHeaders::Block {
                bytes: b"persistent:true\n",
                plain: true
            }
        );
        assert!(!m.is_transient());
        assert_eq!(m.head_bytes(), 8 + 16);
        // The same bytes in a version 2 segment are not a version 1/2 message record.
        assert!(matches!(
            decode_record_as(&out, 7, 2),
            Decoded::Corrupt { .. }
        ));
    }

    /// The version 1 and 2 message record, as the fixtures hold it; still decoded in segments
    /// of those versions.
    #[test]
    fn legacy_message_layout_is_exactly_as_documented() {
        let headers = [Header::new(b"persistent", b"true")];
        let record = LegacyMessageRecord {
            destination: b"/queue/a",
            message_id: b"m-1",
            timestamp_ms: 1_700_000_000_000,
            headers: &headers,
            body: b"hi",
        };
        let mut out = vec![0xAAu8; 256];
        let len = encode_legacy_message(&mut out, 7, &record);
        let header_len = 24 + 8 + 3 + (8 + 10 + 4);
        assert_eq!(
            u64::from_le_bytes(out[0..8].try_into().unwrap()),
            header_len as u64
        );
        assert_eq!(u64::from_le_bytes(out[8..16].try_into().unwrap()), 2);
        assert_eq!(out[16], KIND_MESSAGE);
        assert_eq!(&out[17..20], &[0, 0, 0]);
        assert_eq!(u32::from_le_bytes(out[20..24].try_into().unwrap()), 1);
        assert_eq!(
            u64::from_le_bytes(out[24..32].try_into().unwrap()),
            1_700_000_000_000
        );
        assert_eq!(u32::from_le_bytes(out[32..36].try_into().unwrap()), 8);
        assert_eq!(u32::from_le_bytes(out[36..40].try_into().unwrap()), 3);
        assert_eq!(&out[40..48], b"/queue/a");
        assert_eq!(&out[48..51], b"m-1");
        assert_eq!(u32::from_le_bytes(out[51..55].try_into().unwrap()), 10);
        assert_eq!(u32::from_le_bytes(out[55..59].try_into().unwrap()), 4);
        assert_eq!(&out[59..69], b"persistent");
        assert_eq!(&out[69..73], b"true");
        assert_eq!(&out[73..75], b"hi");
        let body_end = 16 + header_len + 2;
        assert_eq!(body_end, 75);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&7u64.to_le_bytes());
        crc.update(&out[..body_end]);
        assert_eq!(
            u32::from_le_bytes(out[75..79].try_into().unwrap()),
            crc.finalize()
        );
        assert_eq!(len, 80, "79 bytes padded to a multiple of 8");
        assert_eq!(out[79], 0, "padding is zero");
        assert_eq!(out[80], 0xAA, "nothing written past the record");
        for version in [1, 2] {
            let Decoded::Record {
                record: RecordView::Message(m),
                ..
            } = decode_record_as(&out, 7, version)
            else {
                panic!("version {version}");
            };
            assert_eq!(m.message_id(), StoredId::Text(Cow::Borrowed(b"m-1")));
            assert_eq!(m.message_id().binary(), None);
            assert_eq!(
                m.header_block(),
                (Cow::Borrowed(&b"persistent:true\n"[..]), true)
            );
            assert_eq!(m.flags(), 0);
        }
    }

    /// Version 3 readers of the block: `expires` from its line, escapes undone by `headers`,
    /// the transient flag.
    #[test]
    fn a_v3_block_gives_expires_headers_and_flags() {
        let block = b"k:a\\r\\nb\\cc\nexpires:1700000000123\nexpires:5\nplain:v\n";
        let record = RecordRef::Message(MessageRecord {
            destination: b"/queue/a",
            id: BinaryId { shard: 0, seq: 1 },
            timestamp_ms: 0,
            header_block: block,
            block_plain: false,
            transient: true,
            body: b"",
        });
        let bytes = segment_with(&[record], 3);
        let Decoded::Record {
            record: RecordView::Message(m),
            ..
        } = decode_record(&bytes[64..], 3)
        else {
            panic!();
        };
        assert!(m.is_transient());
        assert_eq!(m.flags(), MESSAGE_FLAG_TRANSIENT);
        assert_eq!(
            m.expires_ms(),
            1_700_000_000_123,
            "the first expires counts"
        );
        assert_eq!(m.header_count(), 4);
        let headers: Vec<(Vec<u8>, Vec<u8>)> = m
            .headers()
            .map(|(n, v)| (n.into_owned(), v.into_owned()))
            .collect();
        assert_eq!(headers[0], (b"k".to_vec(), b"a\r\nb:c".to_vec()));
        assert_eq!(headers[3], (b"plain".to_vec(), b"v".to_vec()));
        assert_eq!(m.header_block(), (Cow::Borrowed(&block[..]), false));
    }

    /// Flag bits version 3 does not know, and a block that does not end its last line, are
    /// damage even under a good CRC.
    #[test]
    fn unknown_message_flags_and_an_unended_block_are_corrupt() {
        for (flags, block, field) in [
            (4u8, &b"a:b\n"[..], "flags"),
            (0x80, b"", "flags"),
            (0, b"a:b", "header block end"),
        ] {
            let record = message(b"a:b\n", b"");
            let mut bytes = segment_with(&[record], 0);
            let rec = &mut bytes[64..];
            rec[17] = flags;
            if block.len() == 3 {
                // Same length, last byte not a newline.
                rec[16 + 32 + 8 + 3] = b'x';
            }
            let header_len = u64::from_le_bytes(rec[0..8].try_into().unwrap()) as usize;
            let body_end = 16 + header_len;
            let crc = record_crc(0, &rec[..body_end]);
            rec[body_end..body_end + 4].copy_from_slice(&crc.to_le_bytes());
            match decode_record(rec, 0) {
                Decoded::Corrupt {
                    error: FormatError::BadField { field: f, .. },
                    ..
                } => assert_eq!(f, field),
                other => panic!("{other:?}"),
            }
        }
    }

    /// From version 2 on the writer ends the data after every record: 16 zero bytes right
    /// after it (fewer at the segment's end), written over whatever the file held before.
    #[test]
    fn the_end_marker_follows_the_record_as_far_as_it_fits() {
        let record = message(b"", b"hi");
        let len = record.encoded_len();
        let mut out = vec![0xAAu8; len + 40];
        assert_eq!(encode_record_with_end_marker(&mut out, 7, &record), len);
        assert!(out[len..len + FRAME_BYTES].iter().all(|&b| b == 0));
        assert_eq!(out[len + FRAME_BYTES], 0xAA, "nothing past the marker");
        assert!(matches!(decode_record(&out, 7), Decoded::Record { .. }));
        assert_eq!(decode_record(&out[len..], 7), Decoded::End);
        assert!(ends_data_at(&out, len as u64));
        assert!(!ends_data_at(&out, len as u64 + FRAME_BYTES as u64));

        // Near the end of a segment only what fits is written, and the short rest reads as the
        // end of the data.
        let mut out = vec![0xAAu8; len + 5];
        encode_record_with_end_marker(&mut out, 7, &record);
        assert!(out[len..].iter().all(|&b| b == 0));
        assert_eq!(decode_record(&out[len..], 7), Decoded::End);
        assert!(ends_data_at(&out, len as u64 + 5));
    }

    #[test]
    fn ack_layout_is_exactly_as_documented() {
        let refs = [Position {
            segment: 2,
            offset: 64,
        }];
        let mut out = vec![0u8; 64];
        let len = encode_record(&mut out, 9, &RecordRef::Ack(&refs));
        assert_eq!(u64::from_le_bytes(out[0..8].try_into().unwrap()), 24);
        assert_eq!(u64::from_le_bytes(out[8..16].try_into().unwrap()), 0);
        assert_eq!(out[16], KIND_ACK);
        assert_eq!(u32::from_le_bytes(out[20..24].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(out[24..32].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(out[32..40].try_into().unwrap()), 64);
        assert_eq!(len, 48, "16 + 24 + 4 = 44, padded to 48");
        match decode_record(&out, 9) {
            Decoded::Record {
                record: RecordView::Ack(list),
                len: 48,
            } => assert_eq!(list.iter().collect::<Vec<_>>(), refs),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_record_only_validates_in_its_own_segment() {
        let bytes = segment_with(&[message(b"", b"x")], 5);
        assert!(matches!(
            decode_record(&bytes[64..], 5),
            Decoded::Record { .. }
        ));
        assert!(matches!(
            decode_record(&bytes[64..], 6),
            Decoded::Corrupt {
                error: FormatError::RecordCrc { .. },
                ..
            }
        ));
    }

    #[test]
    fn zeros_end_the_data_and_short_garbage_is_unframed() {
        assert_eq!(decode_record(&[0u8; 100], 0), Decoded::End);
        assert_eq!(decode_record(&[0u8; 3], 0), Decoded::End);
        assert!(matches!(decode_record(&[1u8; 3], 0), Decoded::Unframed(_)));
        // A header length smaller than any header part.
        let mut bytes = [0u8; 100];
        bytes[0] = 4;
        assert!(matches!(
            decode_record(&bytes, 0),
            Decoded::Unframed(FormatError::BadFraming { header_len: 4, .. })
        ));
        // A body running past the segment.
        let mut bytes = [0u8; 100];
        bytes[0] = 8;
        bytes[8] = 200;
        assert!(matches!(decode_record(&bytes, 0), Decoded::Unframed(_)));
        // Huge lengths do not overflow.
        let bytes = [0xFFu8; 100];
        assert!(matches!(decode_record(&bytes, 0), Decoded::Unframed(_)));
    }

    #[test]
    fn scan_skips_a_damaged_record_and_keeps_the_next() {
        let mut bytes = segment_with(&[message(b"", b"one"), message(b"", b"two")], 1);
        bytes[64 + 50] ^= 0x10; // inside the first record's destination
        let items: Vec<_> = SegmentScan::new(&bytes, 1).collect();
        assert_eq!(items.len(), 2);
        assert!(matches!(items[0], ScanItem::Corrupt { offset: 64, .. }));
        match &items[1] {
            ScanItem::Record {
                record: RecordView::Message(m),
                ..
            } => assert_eq!(m.body, b"two"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_kind_and_nonzero_reserved_bytes_are_corrupt_even_with_a_good_crc() {
        for (at, value, expected_kind) in [(16usize, 9u8, true), (17, 8, false), (18, 1, false)] {
            let mut bytes = segment_with(&[message(b"", b"x")], 0);
            let rec = &mut bytes[64..];
            rec[at] = value;
            let header_len = u64::from_le_bytes(rec[0..8].try_into().unwrap()) as usize;
            let body_end = 16 + header_len + 1;
            let crc = record_crc(0, &rec[..body_end]);
            rec[body_end..body_end + 4].copy_from_slice(&crc.to_le_bytes());
            match decode_record(rec, 0) {
                Decoded::Corrupt {
                    error: FormatError::UnknownKind { kind: 9 },
                    ..
                } => assert!(expected_kind),
                Decoded::Corrupt {
                    error: FormatError::BadField { .. },
                    ..
                } => assert!(!expected_kind),
                other => panic!("{other:?}"),
            }
        }
    }

    /// The padding after the CRC is not covered by it and the reader does not look at it: a
    /// record whose covered bytes check out is good whatever its padding holds (the writer
    /// always writes zeros there). Refusing it would drop an intact message; the fuzz check
    /// (`log::testing::check_record_roundtrip`) compares re-encoded records through the CRC.
    #[test]
    fn padding_is_not_checked() {
        let record = message(&[], b"hi");
        let mut bytes = segment_with(&[record], 4);
        let len = record.encoded_len();
        let crc_end = FRAME_BYTES + record.header_len() + record.body_len() + CRC_BYTES;
        assert!(crc_end < len, "the record has padding");
        bytes[64 + crc_end..64 + len].fill(0xEE);
        match decode_record(&bytes[64..], 4) {
            Decoded::Record { len: read, .. } => assert_eq!(read, len),
            other => panic!("{other:?}"),
        }
    }

    fn arb_header() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        (
            proptest::collection::vec(any::<u8>(), 0..20),
            proptest::collection::vec(any::<u8>(), 0..40),
        )
    }

    /// A header block as `Message::from_send` builds one: lines escaped for STOMP 1.2.
    fn block_of(headers: &[(Vec<u8>, Vec<u8>)]) -> (Vec<u8>, bool) {
        let mut block = Vec::new();
        for (name, value) in headers {
            escape_into(&mut block, name, Escaping::V1_2);
            block.push(b':');
            escape_into(&mut block, value, Escaping::V1_2);
            block.push(b'\n');
        }
        let plain = !block.contains(&b'\\');
        (block, plain)
    }

    proptest! {
        #[test]
        fn messages_round_trip(
            destination in proptest::collection::vec(any::<u8>(), 0..50),
            shard in any::<u16>(),
            seq in any::<u64>(),
            timestamp_ms in any::<u64>(),
            headers in proptest::collection::vec(arb_header(), 0..8),
            transient in any::<bool>(),
            body in proptest::collection::vec(any::<u8>(), 0..300),
            sequence in any::<u64>(),
        ) {
            let (block, plain) = block_of(&headers);
            let record = RecordRef::Message(MessageRecord {
                destination: &destination,
                id: BinaryId { shard, seq },
                timestamp_ms,
                header_block: &block,
                block_plain: plain,
                transient,
                body: &body,
            });
            let mut out = vec![0u8; record.encoded_len() + 32];
            let len = encode_record(&mut out, sequence, &record);
            prop_assert_eq!(len % RECORD_ALIGN, 0);
            prop_assert_eq!(len, record.encoded_len());
            match decode_record(&out, sequence) {
                Decoded::Record { record: RecordView::Message(m), len: read } => {
                    prop_assert_eq!(read, len);
                    prop_assert_eq!(m.destination, &destination[..]);
                    prop_assert_eq!(m.message_id(), StoredId::Binary(BinaryId { shard, seq }));
                    prop_assert_eq!(m.timestamp_ms, timestamp_ms);
                    prop_assert_eq!(m.body, &body[..]);
                    prop_assert_eq!(m.is_transient(), transient);
                    prop_assert_eq!(m.header_block(), (Cow::Borrowed(&block[..]), plain));
                    prop_assert_eq!(m.head_bytes(), destination.len() + block.len());
                    // The block's lines unescape to the headers sent (a name with a raw colon
                    // is escaped, so the first raw colon still separates).
                    let read_headers: Vec<(Vec<u8>, Vec<u8>)> = m
                        .headers()
                        .map(|(n, v)| (n.into_owned(), v.into_owned()))
                        .collect();
                    prop_assert_eq!(read_headers, headers);
                }
                other => prop_assert!(false, "{:?}", other),
            }
            prop_assert_eq!(decode_record(&out[len..], sequence), Decoded::End);
        }

        /// Version 1 and 2 message records still decode in segments of those versions, and
        /// their entries escape to the block `Message::from_send` would build.
        #[test]
        fn legacy_messages_round_trip(
            destination in proptest::collection::vec(any::<u8>(), 0..50),
            message_id in proptest::collection::vec(any::<u8>(), 0..30),
            timestamp_ms in any::<u64>(),
            headers in proptest::collection::vec(arb_header(), 0..8),
            body in proptest::collection::vec(any::<u8>(), 0..300),
            sequence in any::<u64>(),
            version in 1u32..=2,
        ) {
            let entries: Vec<Header<'_>> =
                headers.iter().map(|(n, v)| Header::new(n, v)).collect();
            let record = LegacyMessageRecord {
                destination: &destination,
                message_id: &message_id,
                timestamp_ms,
                headers: &entries,
                body: &body,
            };
            let mut out = vec![0u8; record.encoded_len() + 32];
            let len = encode_legacy_message(&mut out, sequence, &record);
            prop_assert_eq!(len, record.encoded_len());
            match decode_record_as(&out, sequence, version) {
                Decoded::Record { record: RecordView::Message(m), len: read } => {
                    prop_assert_eq!(read, len);
                    prop_assert_eq!(m.destination, &destination[..]);
                    prop_assert_eq!(m.message_id(), StoredId::Text(Cow::Borrowed(&message_id[..])));
                    prop_assert_eq!(m.timestamp_ms, timestamp_ms);
                    prop_assert_eq!(m.body, &body[..]);
                    prop_assert!(!m.is_transient());
                    let read_headers: Vec<(Vec<u8>, Vec<u8>)> = m
                        .headers()
                        .map(|(n, v)| (n.into_owned(), v.into_owned()))
                        .collect();
                    prop_assert_eq!(&read_headers, &headers);
                    let (block, plain) = block_of(&headers);
                    prop_assert_eq!(m.header_block(), (Cow::Owned(block), plain));
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        #[test]
        fn refs_round_trip(
            refs in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..40),
            delivered in any::<bool>(),
        ) {
            let refs: Vec<Position> =
                refs.into_iter().map(|(segment, offset)| Position { segment, offset }).collect();
            let record = if delivered { RecordRef::Delivered(&refs) } else { RecordRef::Ack(&refs) };
            let mut out = vec![0u8; record.encoded_len()];
            encode_record(&mut out, 3, &record);
            match decode_record(&out, 3) {
                Decoded::Record { record: RecordView::Ack(list), .. } if !delivered => {
                    prop_assert_eq!(list.iter().collect::<Vec<_>>(), refs);
                }
                Decoded::Record { record: RecordView::Delivered(list), .. } if delivered => {
                    prop_assert_eq!(list.iter().collect::<Vec<_>>(), refs);
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        /// Any single flipped bit in a record is detected; the scan never panics and never
        /// returns the damaged record as good.
        #[test]
        fn any_flipped_bit_is_detected(
            body in proptest::collection::vec(any::<u8>(), 0..200),
            bit in any::<proptest::sample::Index>(),
        ) {
            let headers = b"k:v\n";
            let bytes = segment_with(&[message(headers, &body)], 11);
            let len = message(headers, &body).encoded_len();
            // Padding bytes are not covered by the CRC; flip only covered bits.
            let covered = FRAME_BYTES + message(headers, &body).header_len() + body.len() + CRC_BYTES;
            prop_assert!(covered <= len);
            let bit = bit.index(covered * 8);
            let mut damaged = bytes.clone();
            damaged[64 + bit / 8] ^= 1 << (bit % 8);
            for item in SegmentScan::new(&damaged, 11) {
                let returned_as_good = matches!(item, ScanItem::Record { offset: 64, .. });
                prop_assert!(!returned_as_good);
            }
        }

        /// Arbitrary bytes never make the scanner panic or loop.
        #[test]
        fn scanning_garbage_terminates(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let items = SegmentScan::new(&bytes, 0).count();
            prop_assert!(items <= bytes.len() / RECORD_ALIGN + 1);
        }
    }
}
